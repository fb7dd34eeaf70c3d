"""Training throughput: our Accelerate stage loop vs the Hugging Face Trainer on the same steps and batches.

Both sides start from a deep copy of the same base model with the method attached under the same seed (so LoRA's
random init is identical), train ``steps`` optimiser steps on the same blocks in the same order (our loop's seeded
order; the Trainer reads a Dataset laid out in that order with ``train_sampling_strategy="sequential"``), with the
method's learning rate and weight decay, the same warm-up + schedule, AdamW betas/eps, gradient clipping and
precision. The Trainer is configured the way a careful user would: no evaluation, no saving, no reporting, no
worker processes, logging every step (its per-step loss is what we compare). Each side is timed from building
its accelerator/Trainer to the end of training (what one stage costs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gain_cli.bench.timing import median, paired_ratio, rel_diff, spread
from gain_cli.methods import build_method
from gain_cli.models.flops import flops_per_token
from gain_cli.training.loop import stage_order, train_stage


class OrderedBlocks(torch.utils.data.Dataset):
    """Rows of a tensor as ``{"input_ids", "labels"}`` examples, in the given order."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows[i]
        return {"input_ids": r, "labels": r}


def train_cfg(s, steps: int) -> dict[str, Any]:
    return {"steps": steps, "batch_size": s.train_batch, "grad_accum": 1, "seq_len": s.train_seq,
            "schedule": s.schedule, "warmup_ratio": s.lr_warmup_ratio, "max_grad_norm": s.max_grad_norm,
            "mixed_precision": s.mixed_precision, "log_every": 10**9, "compile": s.train_compile}


def fresh(base_model, method_cfg: dict, spec, seed: int):
    """(model copy with the method attached, method) — same seed, so both sides start identical."""
    method = build_method(method_cfg, spec)
    torch.manual_seed(seed)
    model = method.attach(copy.deepcopy(base_model))
    return model, method


@contextlib.contextmanager
def _trainer_leaves_no_state():
    """Undo what the Trainer leaves behind in the process. With ``torch_compile=True`` TrainingArguments exports
    ACCELERATE_DYNAMO_BACKEND/_MODE into ``os.environ`` and its Accelerator stores a dynamo plugin in Accelerate's
    process-wide state; either would make every later Accelerator of the process (or, for the environment, of
    its subprocesses) compile the models it prepares."""
    from accelerate.state import AcceleratorState

    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
        AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def run_ours(model, method, blocks: torch.Tensor, s, steps: int) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # as TrainingArguments does: a fresh state per stage
    t0 = time.perf_counter()
    acc = Accelerator(mixed_precision=s.mixed_precision)
    marks: list[float] = []
    stats = train_stage(model, method, blocks, train_cfg(s, steps), seed=s.seed, stage=1, accelerator=acc,
                        progress=lambda *_: marks.append(time.perf_counter()))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": steps * s.train_batch * s.train_seq, "losses": list(stats.losses),
            "step_seconds": [b - a for a, b in zip(marks, marks[1:])]}


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    return StepTimer()


def trainer_rows(blocks: torch.Tensor, s, steps: int) -> torch.Tensor:
    """Our loop's blocks in our loop's order, for the Trainer's sequential sampler."""
    return blocks[stage_order(blocks.shape[0], steps * s.train_batch, s.seed, 1)]


def run_trainer(model, method, rows: torch.Tensor, s, steps: int, workdir: Path) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    group = method.optimizer_groups(model)[0]
    warmup = int(round(s.lr_warmup_ratio * steps))  # as gain_cli.training.loop.make_scheduler
    t0 = time.perf_counter()
    with _trainer_leaves_no_state(), _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations inside Trainer.train
        args = TrainingArguments(
            output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=s.train_batch,
            gradient_accumulation_steps=1, learning_rate=float(group["lr"]), weight_decay=float(group["weight_decay"]),
            lr_scheduler_type="constant_with_warmup" if s.schedule == "constant" else s.schedule,
            warmup_steps=warmup, max_grad_norm=s.max_grad_norm, optim="adamw_torch_fused",
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            bf16=s.mixed_precision == "bf16", fp16=s.mixed_precision == "fp16",
            logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, dataloader_pin_memory=False, train_sampling_strategy="sequential",
            remove_unused_columns=False, disable_tqdm=True, use_cpu=True, seed=s.seed, torch_compile=s.train_compile)
        timer = _step_timer()
        trainer = Trainer(model=model, args=args, train_dataset=OrderedBlocks(rows), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log line
        trainer.train()
    seconds = time.perf_counter() - t0
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "tokens": steps * s.train_batch * s.train_seq, "losses": losses,
            "optim": str(args.optim), "step_seconds": [b - a for a, b in zip(timer.marks, timer.marks[1:])]}


@torch.inference_mode()
def heldout_loss(model, batch: torch.Tensor) -> float:
    """LM loss of the trained model on a fixed batch it never trained on (compares the final weights)."""
    was = model.training
    model.eval()
    out = float(model(input_ids=batch, labels=batch).loss)
    model.train(was)
    return out


def bench_training(base_model, spec, method_cfgs: dict[str, dict], blocks: torch.Tensor, heldout: torch.Tensor,
                   s, repeats: int, probe, log=print) -> dict[str, Any]:
    """{method: {...}} plus the matmul probe's per-repeat rates; see the module doc."""
    import gc

    steps = s.train_steps
    rows = trainer_rows(blocks, s, steps)
    peaks: list[float] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gain-bench-trainer-") as tmp:
        workdir = Path(tmp)
        samples: dict[str, dict[str, list]] = {m: {"ours": [], "trainer": []} for m in method_cfgs}
        flops: dict[str, dict] = {}
        warmup_seconds: dict[str, float] = {}
        for name, mcfg in method_cfgs.items():  # warm-up of both sides (first-use kernel selection, imports, compiles)
            if s.warmup_steps > 0:
                m, meth = fresh(base_model, mcfg, spec, s.seed)
                flops[name] = flops_per_token(m, s.train_seq, training=True)
                warmup_seconds[name] = run_ours(m, meth, blocks, s, s.warmup_steps)["seconds"]
                m, meth = fresh(base_model, mcfg, spec, s.seed)
                run_trainer(m, meth, trainer_rows(blocks, s, s.warmup_steps), s, s.warmup_steps, workdir)
                del m, meth
                gc.collect()
            else:
                m, _ = fresh(base_model, mcfg, spec, s.seed)
                flops[name] = flops_per_token(m, s.train_seq, training=True)
                del m
        for r in range(repeats):
            peaks.append(probe.rate(s.probe_repeats))
            for name, mcfg in method_cfgs.items():
                order = ("ours", "trainer") if r % 2 == 0 else ("trainer", "ours")
                for side in order:
                    m, meth = fresh(base_model, mcfg, spec, s.seed)
                    gc.collect()
                    if side == "ours":
                        res = run_ours(m, meth, blocks, s, steps)
                    else:
                        res = run_trainer(m, meth, rows, s, steps, workdir)
                    res["heldout_loss"] = heldout_loss(m, heldout)
                    res["tokens_per_s"] = res["tokens"] / res["seconds"]
                    # steady state: the median step after the first (no set-up, first-step or end-of-stage costs)
                    res["steady_tokens_per_s"] = (s.train_batch * s.train_seq / median(res["step_seconds"])
                                                  if res["step_seconds"] else res["tokens_per_s"])
                    samples[name][side].append(res)
                    del m, meth
                    gc.collect()
                log(f"  train {name} repeat {r + 1}/{repeats}: ours {samples[name]['ours'][-1]['tokens_per_s']:.0f} tok/s, "
                    f"Trainer {samples[name]['trainer'][-1]['tokens_per_s']:.0f} tok/s")
        for name in method_cfgs:
            ours, tr = samples[name]["ours"], samples[name]["trainer"]
            o_rates = [x["tokens_per_s"] for x in ours]
            t_rates = [x["tokens_per_s"] for x in tr]
            fpt = flops[name]["total"]
            o_losses, t_losses = ours[0]["losses"], tr[0]["losses"]
            # one-off cost of a run beyond its steady steps (set-up, first-step kernel choice, compiling)
            o_overhead = median([x["seconds"] - steps * median(x["step_seconds"]) for x in ours if x["step_seconds"]] or [0.0])
            step_diffs = [rel_diff(a, b) for a, b in zip(o_losses, t_losses)]
            results[name] = {
                "ours_tokens_per_s": round(median(o_rates), 1),
                "trainer_tokens_per_s": round(median(t_rates), 1),
                "ratio": round(paired_ratio(o_rates, t_rates), 3),
                "ours_samples": [round(x, 1) for x in o_rates],
                "trainer_samples": [round(x, 1) for x in t_rates],
                "spread": {"ours": round(spread(o_rates), 3), "trainer": round(spread(t_rates), 3)},
                "steady_ours_tokens_per_s": round(median([x["steady_tokens_per_s"] for x in ours]), 1),
                "steady_trainer_tokens_per_s": round(median([x["steady_tokens_per_s"] for x in tr]), 1),
                "steady_ratio": round(paired_ratio([x["steady_tokens_per_s"] for x in ours],
                                                   [x["steady_tokens_per_s"] for x in tr]), 3),
                "ours_overhead_seconds": round(o_overhead, 2),
                "ours_warmup_seconds": round(warmup_seconds[name], 2) if name in warmup_seconds else None,
                "ours_final_loss": o_losses[-1],
                "trainer_final_loss": t_losses[-1],
                "loss_steps_compared": len(step_diffs),
                "loss_max_rel_diff": max(step_diffs) if step_diffs else float("nan"),
                "heldout_loss_ours": ours[0]["heldout_loss"],
                "heldout_loss_trainer": tr[0]["heldout_loss"],
                "heldout_rel_diff": rel_diff(ours[0]["heldout_loss"], tr[0]["heldout_loss"]),
                "losses_ours": [round(x, 6) for x in o_losses],
                "losses_trainer": [round(x, 6) for x in t_losses],
                "trainer_optim": tr[0].get("optim"),
                "flops_per_token": {k: (round(v) if isinstance(v, float) and v > 1 else v) for k, v in flops[name].items()},
                "ours_flops_per_s": round(median([x * fpt for x in o_rates]) / 1e9, 2),  # GFLOP/s
                "trainer_flops_per_s": round(median([x * fpt for x in t_rates]) / 1e9, 2),
                "ours_mfu": round(median([x * fpt / p for x, p in zip(o_rates, peaks)]), 4),
                "trainer_mfu": round(median([x * fpt / p for x, p in zip(t_rates, peaks)]), 4),
            }
    return {"methods": results, "peak_samples_gflops": [round(p / 1e9, 2) for p in peaks],
            "peak_gflops": round(median(peaks) / 1e9, 2), "steps": steps, "batch": s.train_batch,
            "seq_len": s.train_seq, "tokens_per_run": steps * s.train_batch * s.train_seq,
            "mixed_precision": s.mixed_precision, "compiled": s.train_compile}
