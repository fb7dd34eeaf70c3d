"""Per-process memory estimate of a run, from the model config alone (nothing is downloaded or allocated).

The model is built as a skeleton on the ``meta`` device from ``model.hf_config`` (or, when the
config has none, from the ``config.json`` of a local ``model.path``), the method is attached to
that skeleton exactly as in a run, and the parameters are counted with their real dtypes (the
frozen base in ``model.dtype``; GAIN gains and LoRA adapters in fp32). When attaching does not
work on meta tensors the trainable count comes from the architecture table instead.

Terms (bytes, per process, before sharding)::

    weights      = Σ over all parameters of numel × element size     (tied weights once)
    gradients    = 4 × trainable                                       (fp32; frozen weights have none)
    optimizer    = 8 × trainable                                       (AdamW exp_avg + exp_avg_sq, fp32)
    activations  ≈ L · b·s·34·h · e/2  +  8 · b·s·V
                   b = train.batch_size (per process), s = train.seq_len, L layers, h hidden size,
                   V vocabulary, e = 2 with bf16/fp16 (model dtype or mixed precision) else 4.
                   First term: Korthikanti et al. 2022 ("Reducing activation recomputation"), per
                   layer without recomputation, without their 5·a·s² attention-score term (SDPA and
                   flash attention, transformers' defaults, do not store the scores; eager
                   attention would add L·5·a·s²·b·e/2); an upper bound for GAIN/LoRA, where frozen
                   projections keep no inputs for weight gradients. Second term: fp32 logits and
                   their gradient.

Per process::

    sharding=none  (DDP)        weights + gradients + optimizer + activations
    sharding=fsdp|zero3         (weights + gradients + optimizer) / N + gathered + activations
                                gathered = (2 × largest decoder layer + parameters outside the
                                layers) × their element size: the unsharded working copies
                                (current + prefetched layer, embeddings/head in the root unit)

For full fine-tuning of a 16-bit model plain torch AdamW keeps 16-bit gradients and states, so
the fp32 terms are an upper bound there; FSDP with mixed precision instead upcasts the trainable
parameters to fp32 (+2 bytes per parameter for full_ft of a 16-bit model, not counted). Not included: the CUDA context and allocator caches
(~0.5–2 GiB per GPU), communication buffers, lm-eval.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gain_cli.errors import GainError
from gain_cli.models.skeletons import config_without_weights, meta_skeleton
from gain_cli.schemas.run import ModelConfig, TrainConfig, group_of

SHARDINGS = ("none", "fsdp", "zero3")
_SIXTEEN_BIT = ("bfloat16", "float16")


def _hf_config(model_cfg: Mapping[str, Any]):
    return config_without_weights(model_cfg, from_disk=True)[0]


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _attached(base, config, dtype, method_cfg: Mapping[str, Any], spec) -> tuple[int, int, int, str]:
    """(trainable count, parameters added by the method, their bytes, how it was found)."""
    from gain_cli.methods import build_method

    n_base, b_base = sum(p.numel() for p in base.parameters()), _bytes(base.parameters())
    try:
        import warnings

        import torch

        method = build_method(method_cfg, spec)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = method.attach(base)
        trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
        n_all, b_all = sum(p.numel() for p in model.parameters()), _bytes(model.parameters())
        return trainable, n_all - n_base, b_all - b_base, "method attached to a meta-device skeleton"
    except GainError:
        raise
    except Exception:  # noqa: BLE001  (a method that cannot attach to meta tensors)
        from gain_cli.methods import method_class

        method = method_class(method_cfg)(method_cfg, spec)  # the class alone: its count needs no attaching
        trainable = method.table_trainable(meta_skeleton(config, dtype))
        added = 0 if method.trains_every_weight else trainable  # GAIN gains / LoRA adapters are fp32
        return trainable, added, 4 * added, "architecture table (attaching on meta failed)"


def _layer_numels(model, spec) -> list[int]:
    from gain_cli.architectures import decoder_layers

    try:
        return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model, spec)]
    except GainError:
        return []


def memory_estimate(model_cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any],
                    num_processes: int = 1, sharding: str = "none") -> dict[str, Any]:
    """Estimate per-process memory (bytes) for training ``method_cfg`` on ``model_cfg``; see the module doc."""
    from gain_cli.architectures import hidden_size, num_layers
    from gain_cli.methods import method_config
    from gain_cli.models.loading import model_spec, torch_dtype

    if sharding not in SHARDINGS:
        raise GainError(f"unknown sharding '{sharding}' (valid: {', '.join(SHARDINGS)})")
    n = int(num_processes)
    if n < 1:
        raise GainError(f"num_processes must be at least 1 (got {n})")
    model_cfg, train_cfg = ModelConfig.of(model_cfg), TrainConfig.of(train_cfg)
    method_cfg = method_config(method_cfg)
    dtype_name = model_cfg.dtype
    dtype = torch_dtype(dtype_name)
    config = _hf_config(model_cfg)
    spec = model_spec(model_cfg, config.model_type)
    base = meta_skeleton(config, dtype)
    layer_numels = _layer_numels(base, spec)  # before attaching (PEFT moves the layers)
    base_numel, base_bytes = sum(p.numel() for p in base.parameters()), _bytes(base.parameters())
    trainable, added, added_bytes, how = _attached(base, config, dtype, method_cfg, spec)

    params_total = base_numel + added
    weights = base_bytes + added_bytes
    gradients = 4 * trainable
    optimizer = 8 * trainable

    b, s = train_cfg.batch_size, train_cfg.seq_len
    L, h = num_layers(config, spec), hidden_size(config, spec)
    V = int(config.vocab_size)
    mp = train_cfg.mixed_precision
    e = 2 if (dtype_name in _SIXTEEN_BIT or mp in ("bf16", "fp16")) else 4
    activations = (L * b * s * 34 * h * e) // 2 + 8 * b * s * V

    el = dtype.itemsize if hasattr(dtype, "itemsize") else (2 if dtype_name in _SIXTEEN_BIT else 4)
    outside = base_numel - sum(layer_numels)
    states = weights + gradients + optimizer
    if sharding == "none":
        gathered = 0
        per_process = states + activations
    else:
        gathered = (2 * max(layer_numels, default=0) + outside) * el if n > 1 else 0
        per_process = -(-states // n) + gathered + activations
    return {
        "model": model_cfg.name, "model_type": config.model_type, "method": method_cfg.name,
        "dtype": dtype_name, "num_processes": n, "sharding": sharding,
        "params_total": params_total, "params_trainable": trainable, "params_added": added,
        "weights_bytes": weights, "gradients_bytes": gradients, "optimizer_bytes": optimizer,
        "activations_bytes": activations, "gathered_bytes": gathered,
        "per_process_bytes": per_process, "total_bytes": per_process * n,
        "batch_size": b, "seq_len": s, "trainable_from": how,
        "activation_formula": f"L·b·s·34·h·e/2 + 8·b·s·V (L={L}, b={b}, s={s}, h={h}, V={V}, e={e})",
    }


def model_positions(model_cfg: Mapping[str, Any]) -> int | None:
    """The number of positions the model was built for, read from its config without loading weights (None when
    it cannot be told without loading, e.g. a hub model not on disk)."""
    try:
        hf = _hf_config(model_cfg)
    except Exception:  # noqa: BLE001  (unknown here: the model load itself will say what is wrong)
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(hf, key, None) if hf is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_sequence_lengths(cfg, keys: tuple[str, ...] = ("train.seq_len", "eval.block_size")) -> None:
    """``train.seq_len`` and ``eval.block_size`` (``keys``) within the model's positions: one line before any work."""
    from omegaconf import OmegaConf

    positions = model_positions(OmegaConf.to_container(cfg.model, resolve=True))
    if positions is None:
        return
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int) and value > positions:
            raise GainError(f"{key}={value} is longer than model {cfg.model.name}'s {positions} positions "
                            f"(valid: 1..{positions})")


def estimate_for_config(cfg) -> dict[str, Any]:
    """memory_estimate for a composed run config (processes and sharding from its ``launcher``)."""

    # inside a launched process the real count wins (e.g. `accelerate launch --num_processes 8` by hand)
    n = int(os.environ.get("WORLD_SIZE") or group_of(cfg, "launcher").num_processes)
    from gain_cli.training.sharding import requested_sharding

    sharding = requested_sharding(cfg)  # train.sharding, or implied by launcher.accelerate_config
    if sharding == "auto":  # fsdp for methods that train every weight (gain_cli.training.sharding)
        from gain_cli.methods import method_class

        # the class's flag; l2 / ewc: their method.base
        from gain_cli.methods import method_config

        every = getattr(method_class(cfg.method, strict=False), "trains_every_weight", False)
        base = getattr(method_config(cfg.method), "base", None)
        sharding = "fsdp" if (every or base == "full_ft") and n > 1 else "none"
    return memory_estimate(cfg.model, cfg.method, cfg.train, num_processes=n, sharding=sharding)


def gib(n_bytes: float) -> str:
    """Human-readable size (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale / 8:
            return f"{n_bytes / scale:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n_bytes)} B"


def format_estimate(est: Mapping[str, Any]) -> list[str]:
    """Lines for `gain info memory`."""
    n, shard = est["num_processes"], est["sharding"]
    div = f" / {n}" if shard != "none" and n > 1 else ""
    return [
        f"model {est['model']} ({est['model_type']}, {est['dtype']}) · method {est['method']} · "
        f"{n} process(es) · sharding {shard}",
        f"  parameters: {est['params_total']:,} ({est['params_trainable']:,} trainable, "
        f"{est['params_added']:,} added by the method; {est['trainable_from']})",
        f"  weights:     {gib(est['weights_bytes'])}{div}",
        f"  gradients:   {gib(est['gradients_bytes'])}{div}  (fp32, trainable only)",
        f"  optimizer:   {gib(est['optimizer_bytes'])}{div}  (AdamW, 2 fp32 states, trainable only)",
        *([f"  gathered:    {gib(est['gathered_bytes'])}  (unsharded working copies)"] if est["gathered_bytes"] else []),
        f"  activations: {gib(est['activations_bytes'])}  (≈ {est['activation_formula']}, per process)",
        f"  per process: {gib(est['per_process_bytes'])}   all processes: {gib(est['total_bytes'])}",
        "  (rough: excludes the CUDA context, allocator caches and communication buffers)",
    ]


def summary_line(cfg) -> str | None:
    """One line for the start of a run; None when no estimate can be made (never raises)."""
    try:
        est = estimate_for_config(cfg)
    except Exception:  # noqa: BLE001  (an estimate must never stop a run)
        return None
    return (f"memory estimate: ~{gib(est['per_process_bytes'])} per process ({est['num_processes']} process(es), "
            f"sharding {est['sharding']}; weights {gib(est['weights_bytes'])}, trainable {est['params_trainable']:,} params, "
            f"activations {gib(est['activations_bytes'])}) — `gain info memory` for details")
