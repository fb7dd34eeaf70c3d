"""What a user gets by default: a whole stage of our loop with ``train.compile: auto`` against the Hugging Face
Trainer's default (eager), on a stage long enough for compiling to pay (``s.default_steps``, 200 at the smollm2
size).

Our side decides as a run does (``gain_cli.models.compiling.decide_compile``): the eager seconds of the stage
ahead, from our eager steady step time measured by the training section of the same bench, against the compile
cost estimate. Each side is timed from start to end of the stage, the compile included: dynamo's in-process
cache is reset before every compiled run, so each one compiles again; inductor's on-disk kernel cache is warm
after the first (as on any machine that ran gain before), so the first repeat shows the cold cost and the later
ones the warm one. Repeats alternate the order (A,B then B,A) and the ratio combines the pairs as the other
sections do (``paired_ratio``). The losses of both sides are compared step by step.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gain_cli.architectures import decoder_layers
from gain_cli.bench.timing import median, paired_ratio, rel_diff
from gain_cli.bench.training import fresh, run_ours, run_trainer, trainer_rows
from gain_cli.evaluation.perplexity import forward_tokens_per_s
from gain_cli.models.compiling import decide_compile


def step_seconds_estimate(model, blocks: torch.Tensor) -> float:
    """A training step's seconds as a run estimates them before it starts (``gain_cli.runner.estimate_runtime``):
    one timed forward of the batch, a training token costing 3 forward tokens."""
    return 3.0 * blocks.numel() / forward_tokens_per_s(model, blocks)


def bench_default_mode(base_model, spec, method_cfgs: dict[str, dict], blocks: torch.Tensor, s, repeats: int,
                       log=print) -> dict[str, Any]:
    """{method: ours (auto, decided from a timed forward as a run decides) vs the Trainer's default over one
    ``s.default_steps`` stage at ``s.default_batch`` × ``s.default_seq``}."""
    s = replace(s, train_batch=s.default_batch or s.train_batch, train_seq=s.default_seq or s.train_seq)
    steps = s.default_steps
    if blocks.shape[1] != s.train_seq:
        raise ValueError(f"default mode: blocks of {blocks.shape[1]} tokens, settings say {s.train_seq}")

    layers = len(decoder_layers(base_model, spec))
    rows = trainer_rows(blocks, s, steps)
    step_s = step_seconds_estimate(base_model, blocks[: s.train_batch])
    out: dict[str, Any] = {"steps": steps, "batch": s.train_batch, "seq_len": s.train_seq,
                           "step_seconds_estimate": round(step_s, 3), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="gain-bench-default-") as tmp:
        for name, mcfg in method_cfgs.items():
            decision = decide_compile("auto", "train.compile", steps * step_s, layers, "cpu")
            ours_s = replace(s, train_compile=decision.enabled)
            trainer_s = replace(s, train_compile=False)  # the Trainer's default: torch_compile=False
            runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
            for r in range(repeats):
                for side in (("ours", "trainer") if r % 2 == 0 else ("trainer", "ours")):
                    m, meth = fresh(base_model, mcfg, spec, s.seed)
                    gc.collect()
                    if side == "ours":
                        torch._dynamo.reset()  # compile again: what a fresh process pays (warm on-disk cache)
                        res = run_ours(m, meth, blocks, ours_s, steps)
                    else:
                        res = run_trainer(m, meth, rows, trainer_s, steps, Path(tmp))
                    res["tokens_per_s"] = res["tokens"] / res["seconds"]
                    runs[side].append(res)
                    del m, meth
                    gc.collect()
                log(f"  default mode {name} repeat {r + 1}/{repeats}: ours ({'compiled' if decision.enabled else 'eager'}) "
                    f"{runs['ours'][-1]['tokens_per_s']:.0f} tok/s, Trainer {runs['trainer'][-1]['tokens_per_s']:.0f} tok/s")
            torch._dynamo.reset()
            o = [x["tokens_per_s"] for x in runs["ours"]]
            t = [x["tokens_per_s"] for x in runs["trainer"]]
            diffs = [rel_diff(a, b) for a, b in zip(runs["ours"][0]["losses"], runs["trainer"][0]["losses"])]
            out["methods"][name] = {
                "decision": decision.line("train.compile"), "compiled": decision.enabled,
                "ours_tokens_per_s": round(median(o), 1), "trainer_tokens_per_s": round(median(t), 1),
                "ratio": round(paired_ratio(o, t), 3),
                "ours_samples": [round(x, 1) for x in o], "trainer_samples": [round(x, 1) for x in t],
                "ours_seconds": [round(x["seconds"], 1) for x in runs["ours"]],
                "trainer_seconds": [round(x["seconds"], 1) for x in runs["trainer"]],
                "loss_max_rel_diff": max(diffs) if diffs else float("nan"),
                "ours_final_loss": runs["ours"][0]["losses"][-1], "trainer_final_loss": runs["trainer"][0]["losses"][-1],
            }
    return out
