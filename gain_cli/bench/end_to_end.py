"""``gain bench --runs RUN ...``: where the time of whole runs went, and their end-to-end model-FLOPs utilisation.

Each run writes ``timing.json`` (``gain_cli.reporting.timing``): per session its wall time and, per phase
(training, perplexity, lm-eval), seconds, tokens and model FLOPs, plus the shapes of its model's matmul weights.
This measures the dense matmul rate of this machine at those shapes (``MatmulProbe``, the training step's token
count or 2,048 tokens if more, fp32, the process's threads) and reports the share of the wall time of each phase and of the rest
(loading, merging, writing), the FLOPs, and MFU = Σ FLOPs ÷ (matmul peak × wall time). The peak is measured now,
on this machine: run it where the runs ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gain_cli.bench.probes import MatmulProbe
from gain_cli.errors import GainError
from gain_cli.reporting.timing import PHASES, read_timing, time_shares
from gain_cli.rundir import TIMING_FILE

PEAK_MIN_TOKENS = 2048


def end_to_end(run_dirs: list[Path], out: Path | None = None, console=None, probe_repeats: int = 5) -> dict[str, Any]:
    timings = []
    for d in run_dirs:
        t = read_timing(d)
        if t is None or not t.get("sessions"):
            raise GainError(f"{d}: no {TIMING_FILE} (written by runs of this version of gain at their end)")
        timings.append(t)
    last = [t["sessions"][-1] for t in timings]
    models = sorted({s.get("model", "?") for s in last})
    if len(models) > 1:
        raise GainError(f"--runs: the runs use different models ({', '.join(models)}); one model per call")
    counts = {(int(i), int(o)): int(k) for i, o, k in last[0]["matmul_shapes"]}
    # the peak at no fewer tokens than PEAK_MIN_TOKENS: small training steps run their matmuls below the machine's
    # rate, and evaluation batches are larger; a peak measured too small would overstate every MFU
    probe = MatmulProbe(None, max(int(last[0]["step_tokens"]), PEAK_MIN_TOKENS), counts=counts)
    res = time_shares(timings, probe.rate(probe_repeats))
    res["model"] = models[0]
    res["run_dirs"] = [str(d) for d in run_dirs]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "end_to_end.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (out / "end_to_end.md").write_text(markdown(res), encoding="utf-8")
    if console is not None:
        console.print(markdown(res), highlight=False, markup=False)
    return res


def markdown(r: dict[str, Any]) -> str:
    lines = [f"{r['runs']} run(s) of {r['model']} · wall {r['wall_seconds'] / 60:.1f} min · fp32 matmul peak "
             f"{r['peak_flops_per_s'] / 1e9:.0f} GFLOP/s · end-to-end MFU {100 * r['mfu']:.1f} %", "",
             "| phase | seconds | share of wall | model FLOPs | MFU in the phase |", "|---|---:|---:|---:|---:|"]
    for p in (*PHASES, "other"):
        mfu = r["phase_mfu"].get(p) if p in PHASES else None
        flops = r["flops"].get(p)
        lines.append(f"| {p} | {r['seconds'][p]:,.1f} | {100 * (r['share'][p] or 0):.0f} % | {_flops(flops)} | "
                     f"{'' if mfu is None else f'{100 * mfu:.0f} %'} |")
    return "\n".join(lines) + "\n"


def _flops(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x / 1e12:,.2f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"
