"""The ``study:`` block of a study recipe (recipes/smollm2_study.yaml): the protocol ``gain study`` runs.

The protocol's values are set in the recipe, before any of its results are seen; the defaults here are ours.
"""

from __future__ import annotations

from gain_cli.schemas.typed import Section, at_least, between, section, setting


@section("study.bootstrap")
class BootstrapConfig(Section):
    replicates: int = setting(1000, "bootstrap replicates of every interval", check=at_least(100))
    level: float = setting(0.95, "confidence level of every interval",
                           check=between(0.5, 1, "in (0.5, 1)", open_lo=True, open_hi=True))


@section("study.figures")
class FiguresConfig(Section):
    enabled: bool = setting(True, "draw the paper's Figures 1, 3 and 4 from the first seed of GAIN-FFN and LoRA")
    max_blocks: int | None = setting(None, "validation blocks per domain for the figures (null: eval.max_blocks)",
                                     check=at_least(1))
    tokens: bool = setting(True, "Figure 1: the per-token loss change on the other domains")
    tokens_stage: int = setting(1, "the stage whose per-token change Figure 1 shows", check=at_least(1))
    interpolate: bool = setting(True, "Figure 3: the loss along the interpolation from the base model to stage 1")
    points: int = setting(5, "interpolation points of Figure 3", check=at_least(2))
    combine: bool = setting(True, "Figure 4: two stages' adaptations combined")


@section("study")
class StudyConfig(Section):
    name: str | None = setting(None, "the study's name (its folder under output_root; null: the recipe's)")
    methods: dict = setting({}, "method -> {lr, seeds}: each lr chosen by the rule in the recipe's header")
    lr_grid: dict = setting({}, "method -> the learning rates `gain study --sweep lr-select` tries")
    lora_lr_sweep: list = setting([], "LoRA learning rates of `gain study --sweep lora-lr` (the paper's Figure 2)")
    bootstrap: BootstrapConfig | None = setting(None, "the intervals' bootstrap")
    figures: FiguresConfig | None = setting(None, "the paper's figures in the report")
    claims: dict = setting({}, "overrides of the paper's claims the report tests (gain_cli/reporting/study_report.py)")

    def __post_init__(self):
        self.bootstrap = self.bootstrap or BootstrapConfig()
        self.figures = self.figures or FiguresConfig()
