"""`gain study` (`make study`): does GAIN forget less than LoRA and full fine-tuning? The paper's comparison in
miniature on the embedded default, with confidence intervals.

A study is a recipe (``recipes/<name>.yaml``) whose ``study:`` block fixes the protocol before any result is seen:
which methods run, at which learning rate (chosen by a rule stated in the recipe), with which seeds, and the two
sweeps that back the protocol. ``gain study`` expands it into one run per (method, seed) under
``<output_root>/<study>/<method>/seed<S>``, shares one base-model row between all of them (``base_row``), runs
what is unfinished (a second ``make study`` resumes where the first stopped), then writes one report
(``gain_cli.reporting.study_report``) with the paper's figures.

Sweeps (``--sweep``):

* ``lr-select``: the learning-rate rule. Each method at each grid value trains the first domain only (seed 0, the
  study's budget); the value with the lowest in-domain validation PPL on that domain wins. The table and the
  chosen values are written to ``<study>/lr_select/``; the recipe carries the chosen values.
* ``lora-lr``: the paper's Figure 2. LoRA over the whole sequence at every value of ``study.lora_lr_sweep``; the
  Pareto plot of in-domain improvement vs earlier-domain change, with the study's GAIN runs on the same axes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gain_cli.analysis.paper_figures import paper_figures
from gain_cli.config import compose_config, group_choices
from gain_cli.errors import GainError, unknown_choice
from gain_cli.preflight import check_run
from gain_cli.reporting import study_report
from gain_cli.rundir import STATE_FILE, TRAIN_FILE, RunDir
from gain_cli.runner import run_experiment
from gain_cli.schemas.study import FiguresConfig, StudyConfig

SIZES = {"default": "smollm2_study", "tiny": "tiny_study"}
SWEEPS = ("lr-select", "lora-lr")


@dataclass
class StudyRun:
    """One run of a study: a method at a fixed lr and seed."""

    method: str
    seed: int
    lr: float
    run_dir: Path
    overrides: list[str]
    cfg: DictConfig | None = None
    group: str = ""           # the report groups runs by this (the method, or method@lr in a sweep)


@dataclass
class StudySpec:
    """The ``study:`` block of a study recipe (see recipes/smollm2_study.yaml), checked."""

    name: str
    recipe: str
    methods: dict[str, dict[str, Any]]            # method -> {lr, seeds}
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    lora_lr_sweep: list[float] = field(default_factory=list)
    replicates: int = 1000
    level: float = 0.95
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    claims: dict[str, Any] = field(default_factory=dict)


def _number_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise GainError(f"{where} must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise GainError(f"{where} must hold positive numbers, got {v!r}")
        out.append(float(v))
    return out


def study_spec(cfg: DictConfig) -> StudySpec:
    """Read and check the ``study:`` block of a composed study recipe (GainError naming the bad key)."""
    if cfg.study is None:
        raise GainError(f"recipe '{cfg.recipe}' has no study: block (study recipes: {', '.join(SIZES.values())})")
    s = StudyConfig.of(cfg.study)
    methods = s.methods
    if not methods:
        raise GainError("study.methods must map method names to {lr, seeds}")
    valid = group_choices("method")
    for m, spec in methods.items():
        if m not in valid:
            raise unknown_choice("study.methods", m, valid)
        if not isinstance(spec, dict) or "lr" not in spec or "seeds" not in spec:
            raise GainError(f"study.methods.{m} needs lr and seeds (e.g. {{lr: 1e-3, seeds: [0, 1]}})")
        _number_list([spec["lr"]], f"study.methods.{m}.lr")
        seeds = spec["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in seeds) or len(set(seeds)) != len(seeds):
            raise GainError(f"study.methods.{m}.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    for m in s.lr_grid:
        if m not in valid:
            raise unknown_choice("study.lr_grid", m, valid)
    return StudySpec(
        name=str(s.name or cfg.recipe), recipe=str(cfg.recipe), methods=methods,
        lr_grid={m: _number_list(v, f"study.lr_grid.{m}") for m, v in s.lr_grid.items()},
        lora_lr_sweep=_number_list(s.lora_lr_sweep, "study.lora_lr_sweep") if s.lora_lr_sweep else [],
        replicates=s.bootstrap.replicates, level=float(s.bootstrap.level), figures=s.figures, claims=s.claims)


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def plan_runs(spec: StudySpec, root: Path, sweep: str | None, overrides: Sequence[str],
              first_domain: str) -> list[StudyRun]:
    """Every run of the study (or of one of its sweeps), in order; the first run evaluates the base row."""
    runs: list[StudyRun] = []
    if sweep is None:
        # the methods with the most seeds (the head-to-head pair) first, all their seeds, then the others: a study
        # stopped early has its main comparison complete
        order = list(spec.methods)
        plan = sorted(((m, i, seed) for m, ms in spec.methods.items() for i, seed in enumerate(ms["seeds"])),
                      key=lambda t: (-len(spec.methods[t[0]]["seeds"]), order.index(t[0]), t[1]))
        for m, _i, seed in plan:
            ms = spec.methods[m]
            runs.append(StudyRun(m, int(seed), float(ms["lr"]), root / m / f"seed{seed}", [], group=m))
    elif sweep == "lr-select":
        if not spec.lr_grid:
            raise GainError("the study has no study.lr_grid to select learning rates from")
        for m, values in spec.lr_grid.items():
            for lr in values:
                runs.append(StudyRun(m, 0, lr, root / "lr_select" / m / _lr_tag(lr),
                                     [f"domains.sequence=[{first_domain}]", "eval.harness.enabled=false"],
                                     group=f"{m}@{lr:g}"))
    elif sweep == "lora-lr":
        if not spec.lora_lr_sweep:
            raise GainError("the study has no study.lora_lr_sweep")
        main_lora = spec.methods.get("lora") or {}
        for lr in spec.lora_lr_sweep:
            # the main study's LoRA seed-0 run is this sweep's run at the same lr (same config): share it
            shared = 0 in [int(s) for s in main_lora.get("seeds", [])] and float(main_lora.get("lr", -1)) == lr
            run_dir = root / "lora" / "seed0" if shared else root / "lora_lr" / _lr_tag(lr)
            runs.append(StudyRun("lora", 0, lr, run_dir, [], group=f"lora@{lr:g}"))
    else:
        raise unknown_choice("--sweep", sweep, list(SWEEPS))
    # one row 0 for every run of the same model, domains and evaluation: the main study's first run's
    first = next(iter(spec.methods))
    base_from = runs[0].run_dir if sweep == "lr-select" else root / first / f"seed{spec.methods[first]['seeds'][0]}"
    for r in runs:
        r.overrides = [f"method={r.method}", f"method.lr={r.lr:g}", f"seed={r.seed}", f"run_dir={r.run_dir}",
                       *r.overrides, *overrides, f"base_row={base_from}"]
    return runs


def _complete(run_dir: Path) -> bool:
    return RunDir(run_dir).info().get("status") == "complete"


class StudyProgress:
    """One line per finished row: a bar over the whole study, elapsed time and the time left (ETA)."""

    def __init__(self, console, total: int, done: int):
        self.console, self.total, self.done0, self.done = console, total, done, done
        self.t0 = time.perf_counter()

    def line(self) -> str:
        width = 30
        filled = int(round(width * self.done / max(self.total, 1)))
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.done0) / elapsed if elapsed > 0 and self.done > self.done0 else None
        left = f"~{(self.total - self.done) / rate / 60:.1f} min left" if rate else "time left: after the first row"
        return (f"study [{'█' * filled}{'░' * (width - filled)}] {self.done}/{self.total} rows · "
                f"{elapsed / 60:.1f} min · {left}")

    def row_done(self) -> None:
        self.done += 1
        if self.console is not None:
            self.console.print(self.line(), highlight=False, markup=False)


def _rows_total(runs: Sequence[StudyRun]) -> tuple[int, int]:
    """(rows the study computes in all, rows already on disk): base rows + one per stage."""

    total = done = 0
    for r in runs:  # a row 0 taken from another run counts too (it takes no time)
        total += len(r.cfg.domains.sequence) + 1
        done += len(RunDir(r.run_dir).finished_stages()) + int(RunDir(r.run_dir).base_done())
    return total, done


def reuse_selected_stage(r: StudyRun, root: Path) -> bool:
    """A seed-0 run at the lr chosen by the lr-select sweep trains its first stage exactly as that sweep's run did
    (same seed, data order, lr and budget): take that trained state instead of training it again (the runner then
    only evaluates it on every domain). True when a state was taken."""
    import shutil


    src = RunDir(root / "lr_select" / r.method / _lr_tag(r.lr)).stage_dir(1)
    dst = RunDir(r.run_dir).stage_dir(1)
    if r.seed != 0 or not (src / STATE_FILE).is_file() or not (src / TRAIN_FILE).is_file() or (dst / STATE_FILE).exists():
        return False
    if RunDir(r.run_dir).holds_run():  # a run already started trains its own stages
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in (STATE_FILE, TRAIN_FILE):
        shutil.copy2(src / name, dst / name)
    return True


def run_study(console, size: str = "default", sweep: str | None = None, overrides: Sequence[str] = (),
              output_root: str | Path = "runs", report: bool = True, run_missing: bool = True,
              run: Callable[[DictConfig, Any, Callable], Path] | None = None) -> Path:
    """Run (or resume) a study or one of its sweeps; return its report (``report.md``). ``run_missing=False``: only
    write the report, from the runs that are finished (the others are named in it)."""
    if size not in SIZES:
        raise unknown_choice("--size", size, list(SIZES))
    recipe = SIZES[size]
    base_cfg = compose_config(list(overrides), recipe)
    spec = study_spec(base_cfg)
    root = Path(output_root) / spec.name
    runs = plan_runs(spec, root, sweep, overrides, str(base_cfg.domains.sequence[0]))
    for r in runs:  # every run composed and checked before the first one starts
        r.cfg = compose_config([*r.overrides, "resume=true"], recipe)
        if not RunDir(r.run_dir).holds_run():
            r.cfg.resume = False
        check_run(r.cfg)
    total, done = _rows_total(runs)
    progress = StudyProgress(console, total, done)
    what = f"sweep {sweep}" if sweep else "study"
    console.print(f"{what} {spec.name}: {len(runs)} runs ({', '.join(sorted({r.group for r in runs}))}), "
                  f"{total} rows, {done} already done · {root}", highlight=False)
    run = run or (lambda cfg, con, ev: run_experiment(cfg, con, on_event=ev))
    t0 = time.perf_counter()
    for i, r in enumerate(runs, 1):
        if _complete(r.run_dir) or not run_missing:
            continue
        if sweep is None:
            reuse_selected_stage(r, root)
        console.rule(f"{what} · run {i}/{len(runs)} · {r.method} lr {r.lr:g} seed {r.seed}")
        run(r.cfg, console, lambda kind, _row: progress.row_done() if kind == "row" else None)
    seconds = time.perf_counter() - t0
    console.print(f"{what} runs finished in {seconds / 60:.1f} min", highlight=False)
    if not report:
        return root

    if sweep == "lr-select":
        path = study_report.write_lr_selection(runs, spec, root / "lr_select")
    elif sweep == "lora-lr":
        main_runs = [r for r in plan_runs(spec, root, None, overrides, str(base_cfg.domains.sequence[0]))
                     if r.method.startswith("gain") and _complete(r.run_dir)]
        path = study_report.write_lora_lr_sweep(runs, main_runs, spec, root / "lora_lr")
    else:
        path = study_report.write_study_report(runs, spec, root / "report", base_cfg, paper_figures)
    console.print(f"report: {path}", highlight=False)
    return path
