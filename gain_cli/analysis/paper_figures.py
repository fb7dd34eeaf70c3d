"""The paper's Figures 1, 3 and 4 for a study's report, from the first seed of GAIN-FFN and LoRA (``study.figures``
says which and with how many validation blocks); ``gain study`` hands this to the report writer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gain_cli.analysis.combination import combination
from gain_cli.analysis.interpolation import interpolation
from gain_cli.analysis.token_shift import token_shift
from gain_cli.io import file_slug
from gain_cli.schemas.study import FiguresConfig


def paper_figures(run_dirs: Sequence[Path], cfg: Mapping[str, Any] | FiguresConfig,
                  out_dir: Path) -> list[tuple[str, Path]]:
    """(caption, PNG) of each figure drawn from ``run_dirs`` into ``out_dir``."""
    out: list[tuple[str, Path]] = []
    if not run_dirs:
        return out
    cfg = FiguresConfig.of(cfg)
    max_blocks = cfg.max_blocks
    if cfg.tokens:
        stage = cfg.tokens_stage
        out.append((f"Figure 1: per-token loss change on the other domains after stage {stage}",
                    token_shift(run_dirs, out_dir / "fig1_tokens", stage=stage, max_blocks=max_blocks)))
    if cfg.interpolate:
        out.append(("Figure 3: loss along the interpolation from the base model to stage 1",
                    interpolation(run_dirs, out_dir / "fig3_interpolate", stage=1, points=cfg.points,
                                  max_blocks=max_blocks)))
    if cfg.combine:
        for rd in run_dirs:
            out.append((f"Figure 4: two stages' adaptations combined ({rd.parent.name})",
                        combination(rd, out_dir / f"fig4_combine_{file_slug(rd.parent.name)}", stages=(1, 2),
                                    max_blocks=max_blocks)))
    return out
