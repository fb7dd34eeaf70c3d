"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), driven by gain itself.

One switch, ``train.sharding``::

    none   every process holds the whole model (one process, or data parallel through Accelerate)
    fsdp   parameters, gradients and optimiser states split over the processes: ``fully_shard`` on every
           decoder layer (the architecture table's ``layers``), then on the root, on a device mesh of the
           accelerator's device type ("cuda" with nccl on GPUs, "cpu" with gloo on CPU)
    zero3  the same split by DeepSpeed ZeRO-3 (an optional extra: gain_cli.training.zero3)
    auto   fsdp for methods that train every weight (full fine-tuning) under several processes, else none

``launcher.accelerate_config=fsdp`` (a config file whose ``distributed_type`` is FSDP) means ``fsdp`` too, and so
does a hand launch with ``ACCELERATE_USE_FSDP=true``; ``launcher.accelerate_config=deepspeed_zero3`` (or
``ACCELERATE_USE_DEEPSPEED=true`` with ZeRO stage 3) means ``zero3``. Accelerate is never the one that shards: on CPU it silently
drops an FSDP plugin (and DDP-wraps an already sharded model, which then fails), so gain keeps Accelerate for what
it does on every device (ranks, process group, autocast) and shards the model natively, as torchtune does.

How a sharded run keeps the method's structure: the method is attached once, to the base model, before sharding
(``Method.attach``: GAIN wrappers with gains of one, LoRA adapters with B = 0, (IA)³ vectors of one: the base
model's function exactly), and every stage then reopens it in place (``Method.open_sharded_stage``: fresh values,
the same random draws as a fresh attach) and folds it into the local weight shards when the stage ends
(``Method.close_sharded_stage``). Modules never change under FSDP, so the model is sharded once per run.

The helpers below let one code path handle plain tensors, FSDP's DTensors and ZeRO-3's partitioned parameters
alike (``is_partitioned``): ``full`` gathers (a collective: every process must call it, in the same order),
``set_full_`` / ``add_full_`` / ``mul_replicated_`` write into the local shards of a parameter from a full tensor
without gathering the parameter.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn

from gain_cli.accelerate_configs import sharding_of
from gain_cli.architectures import decoder_layers
from gain_cli.errors import GainError
from gain_cli.schemas.run import SHARDING, group_of
from gain_cli.training import zero3

SHARDINGS = SHARDING
TIMEOUT_ENV = "GAIN_DIST_TIMEOUT_S"  # process-group timeout in seconds (tests: a hang fails fast)


def process_group_timeout() -> timedelta | None:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        return timedelta(seconds=float(value))
    except ValueError:
        raise GainError(f"{TIMEOUT_ENV} must be a number of seconds, got '{value}'") from None


def requested_sharding(cfg) -> str:
    """``none``, ``fsdp``, ``zero3`` or ``auto`` from ``train.sharding``, the launcher's Accelerate config or the
    environment."""
    value, launcher = group_of(cfg, "train").sharding, group_of(cfg, "launcher")
    from_file = sharding_of(launcher.accelerate_config) if launcher.accelerate_config else "none"
    # a hand launch with a DeepSpeed config (accelerate launch sets these; make_accelerator then drops the first,
    # so that Accelerate builds no DeepSpeed plugin of its own, and the stage stays)
    deepspeed_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    stage_env = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if deepspeed_env and stage_env not in (None, "", "3"):
        raise GainError(f"DeepSpeed ZeRO stage {stage_env} is not supported: gain shards with ZeRO stage 3 "
                        "(train.sharding=zero3) or FSDP2 (train.sharding=fsdp)")
    if deepspeed_env or stage_env == "3" or from_file == "zero3":
        return "zero3"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or from_file == "fsdp":
        return "fsdp"
    return value


def trains_every_weight(method) -> bool:
    """The method trains the model's own weights (full FT, and l2 / ewc on it)."""
    return bool(getattr(method, "trains_every_weight", False))


def sharding_mode(cfg, num_processes: int, method=None) -> str:
    """The sharding a run uses: ``fsdp``, ``zero3`` or ``none`` (one process has nothing to shard)."""
    mode = requested_sharding(cfg)
    if mode == "auto":
        mode = "fsdp" if method is not None and trains_every_weight(method) else "none"
    return mode if num_processes > 1 else "none"


# --- sharding a model --------------------------------------------------------------------------------------

def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def shard_model(model: nn.Module, spec, device_type: str, world: int) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root, on a 1-D mesh of ``world`` processes (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))  # the mesh is always explicit (gloo next to CUDA: pytorch#132471)
    for layer in decoder_layers(hf_model(model), spec):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return (isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())
            or any(zero3.is_zero_param(p) for p in model.parameters()))


def reshard(model: nn.Module) -> None:
    """Free every unsharded copy (the root stays gathered after a no-grad forward): before editing weights in place."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    zero3.release_all(model)


# --- tensors that may be DTensors --------------------------------------------------------------------------

def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_partitioned(t) -> bool:
    """A parameter split over the processes: an FSDP DTensor or a ZeRO-3 parameter."""
    return is_dtensor(t) or zero3.is_zero_param(t)


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape (a ZeRO-3 parameter's ``shape`` is (0,) outside a forward)."""
    return tuple(t.ds_shape) if zero3.is_zero_param(t) else tuple(t.shape)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the shards of a DTensor or a ZeRO-3 parameter: a collective)."""
    if zero3.is_zero_param(t):
        return zero3.full(t)
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (differentiable), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


@torch.no_grad()
def set_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param ← value`` where ``value`` is the whole tensor (the same on every process)."""
    if zero3.is_zero_param(param):
        zero3.set_full(param, value)
    elif is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = value.detach().to(param.device_mesh.device_type, param.dtype)
        param.to_local().copy_(distribute_tensor(value, param.device_mesh, param.placements).to_local())
    else:
        param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def add_full_(param: torch.Tensor, delta: torch.Tensor) -> None:
    """``param += delta`` (whole ``delta``, laid out like the parameter), on the local shards only."""
    if zero3.is_zero_param(param):
        zero3.add_full(param, delta)
    elif is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        delta = delta.detach().to(param.device_mesh.device_type)
        shard = distribute_tensor(delta, param.device_mesh, param.placements).to_local()
        out = param.to_local()
        out.copy_((out.float() + shard.float()).to(out.dtype))
    else:
        param.copy_((param.float() + delta.to(param.device).float()).to(param.dtype))


@torch.no_grad()
def mul_replicated_(param: torch.Tensor, factor: torch.Tensor) -> None:
    """``param *= factor`` with a broadcastable whole ``factor`` (e.g. ``s[None, :]``), computed in fp32."""
    if zero3.is_zero_param(param):
        zero3.mul_full(param, factor)
    elif is_dtensor(param):
        from torch.distributed.tensor import Replicate, distribute_tensor

        factor = factor.detach().float().to(param.device_mesh.device_type)
        rep = distribute_tensor(factor, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
        param.copy_((param.float() * rep).to(param.dtype))
    else:
        param.copy_((param.float() * factor.to(param.device).float()).to(param.dtype))


def global_sum(local_term: torch.Tensor) -> torch.Tensor:
    """A sum over the shards of all processes: the value is the all-reduced sum, the gradient the local term's.

    A penalty on sharded parameters (Σ over a weight) computed on the local shards: every process adds the whole
    penalty to its loss, and each local shard gets exactly its own share of the gradient (FSDP's gradient average
    over processes is applied to the language-model loss only, which is what one process computes too).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_term
    total = local_term.detach().clone()
    dist.all_reduce(total)
    return local_term + (total - local_term.detach())


def is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of this process's parameters (local shards of DTensors; tied parameters once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if zero3.is_zero_param(p):
            n += zero3.partition_bytes(p)
            continue
        t = local(p)
        n += t.numel() * t.element_size()
    return n


# --- optimiser state (mid-stage checkpoints) ---------------------------------------------------------------

def save_sharded_optimizer(model: nn.Module, optimizer, folder) -> None:
    """Each process writes its shards of the optimiser state (torch.distributed.checkpoint; ZeRO-3: DeepSpeed's
    checkpoint, ``optimizer`` being the run's engine) into ``folder``."""
    if is_zero3_engine(optimizer):
        zero3.save_optimizer(optimizer, folder)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def is_zero3_engine(obj) -> bool:
    return hasattr(obj, "save_checkpoint") and hasattr(obj, "load_checkpoint")


def load_sharded_optimizer(model: nn.Module, optimizer, folder) -> None:
    if is_zero3_engine(optimizer):
        zero3.load_optimizer(optimizer, folder)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
