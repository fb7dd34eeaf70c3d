"""The one small interface every adaptation method implements.

Lifecycle of one stage (driven by ``gain_cli.training.stage``)::

    model = method.attach(model)               # freeze the base, add/wrap trainable parts
    params = method.trainable_parameters(model)
    loss = model(input_ids=...).loss + method.regularization(model)
    state = method.state_dict(model)           # saved as stages/stage_K/method_state.safetensors
    model = method.finish_stage(model)         # carry forward (merge into the weights by default)

Rebuilding the model after stage K from disk (resume, ``gain merge``, ``gain eval``)
replays the same calls with ``load_state_dict`` instead of training::

    model = method.attach(model); method.load_state_dict(model, state); model = method.finish_stage(model)

A method is added in one place: a module in ``gain_cli/methods/`` with a ``Method``
subclass registered by ``@register("kind", config=ItsConfig)`` (a :class:`MethodConfig` subclass: its settings'
types, defaults, help and checks; ``gain info method NAME`` prints them) and a YAML in ``configs/method/``. Penalties toward the previous
stage (``method.penalty``: l2, ewc) are separate objects any method carries (``gain_cli.methods.penalties``); a
method only says what its stage's change is (``penalty_weights``, ``displacements``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gain_cli.architectures import ArchSpec
from gain_cli.errors import GainError
from gain_cli.schemas.typed import Section, between, non_negative, section, setting

METHOD_KINDS: dict[str, type["Method"]] = {}
PENALTIES: dict[str, type] = {}  # name -> gain_cli.methods.penalties.Penalty subclass (method.penalty)


@dataclass
class StageContext:
    """What a method may look at around one stage (hooks ``stage_blocks`` and ``after_training``)."""

    stage: int  # 1-based
    domain: str  # the stage's domain
    earlier: list[str]  # domains of the stages before this one, in order
    data: Any  # gain_cli.data.domains.DomainData: .blocks(name, split, block_len)
    train_cfg: Mapping[str, Any]
    seed: int
    accelerator: Any


LR_RANGE = between(0, 1, "a number in (0, 1]", open_lo=True)  # every method's method.lr


@section("method")
class MethodConfig(Section):
    """The settings every method has; a method's own config class adds its fields."""

    name: str = setting("", "the config's name (configs/method/<name>.yaml; its runs' folder); default: the kind")
    kind: str = setting("", "the registered method kind (gain_cli/methods/)")
    lr: float = setting(1.0e-4, "AdamW learning rate of the method's trainable parameters",
                        check=LR_RANGE)
    weight_decay: float | None = setting(0.0, "AdamW weight decay (null: 0)", check=non_negative())
    penalty: Any = setting(None, "a penalty toward the previous stage: l2 | ewc | {name: ewc, lambda: ..., ...} "
                           "(gain_cli/methods/penalties.py)")

    def __post_init__(self):
        self.kind = self.kind or self.name  # a config names its kind, its name, or both
        self.name = self.name or self.kind


def register(kind: str, config: type[MethodConfig] = MethodConfig):
    """Register a ``Method`` subclass under ``kind`` with its config class."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.kind = kind
        cls.config = config
        METHOD_KINDS[kind] = cls
        return cls

    return deco


def register_penalty(name: str):
    def deco(cls):
        cls.name = name
        PENALTIES[name] = cls
        return cls

    return deco


class Method(ABC):
    """Base class. ``cfg`` is the method's config group (``configs/method/<name>.yaml``)."""

    kind: ClassVar[str] = ""
    config: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = True  # False: adapted model is not a single plain HF model (IMSM)
    cumulative_state: ClassVar[bool] = False  # True: the last stage's state alone rebuilds the model
    # why the method cannot train sharded (train.sharding=fsdp); None: it can (open/close_sharded_stage below)
    sharding_refusal: ClassVar[str | None] = "it has no sharded implementation"
    # why the method cannot train boundary-free (train.domain_schedule=drift: attached once, never merged, no domain
    # labels; gain_cli.training.drift); None: it can
    boundary_refusal: ClassVar[str | None] = None

    def __init__(self, cfg: Mapping[str, Any] | MethodConfig, spec: ArchSpec):
        self.cfg = type(self).config.of(cfg)
        self.spec = spec
        self.name = self.cfg.name or self.kind

    def check_model(self, model: nn.Module) -> None:
        """A one-line GainError when the method cannot attach to ``model`` (called before the run starts)."""

    # --- training -----------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze what must stay fixed and add the trainable parts; return the model to train."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW parameter groups; the learning rate is the method's own (``method.lr``)."""
        params = [p for _, p in self.trainable_parameters(model)]
        return [{"params": params, "lr": float(self.cfg.lr), "weight_decay": float(self.cfg.weight_decay or 0.0)}]

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """Extra loss term added to the LM loss (e.g. L2 pull of the gains toward 1)."""
        return None

    def regularizes(self) -> bool:
        """True when ``regularization`` adds a term (train.sharding=zero3 refuses: it reads parameters outside the
        forward, where ZeRO-3 keeps them empty)."""
        return False

    # --- what a penalty toward the previous stage measures (gain_cli.methods.penalties) -------
    # True: the stage's change is the trainable parameters minus their values at attach (an anchor is copied);
    # False: the method's ``displacements`` are deltas by themselves (LoRA: ΔW = scale · B A)
    anchored: ClassVar[bool] = True

    def penalty_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors whose change a penalty measures, by name (EWC's Fisher is taken w.r.t. them)."""
        return dict(self.trainable_parameters(model))

    def displacements(self, model: nn.Module, anchor: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The stage's change per penalised tensor (fp32, differentiable): parameters minus the anchor."""
        if anchor is None:
            return {}
        return {n: p.float() - anchor[n].float() for n, p in self.trainable_parameters(model)}

    # --- optional stage hooks -----------------------------------------------------------
    def stage_blocks(self, ctx: StageContext) -> torch.Tensor:
        """The packed training blocks of a stage (replay methods mix in earlier domains)."""
        return ctx.data.blocks(ctx.domain, "train", int(ctx.train_cfg["seq_len"]))

    def training_order(self, n_blocks: int, n_needed: int, seed: int, stage: int) -> torch.Tensor | None:
        """The order in which the loop takes the blocks ``stage_blocks`` returned (indices, ``n_needed`` of them);
        None: the loop's own seeded reshuffled passes (``training.loop.stage_order``). A method that composes its
        stage's exact sequence (replay) returns ``arange``."""
        return None

    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        """Called after the stage's training, before ``state_dict`` (e.g. EWC's Fisher estimate)."""

    def stage_info(self) -> dict[str, Any]:
        """Extra facts about the last stage, stored in its metrics.json (e.g. replayed examples)."""
        return {}

    # --- state --------------------------------------------------------------------
    @abstractmethod
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's own trained state (small for GAIN/LoRA; all weights for full FT)."""

    @abstractmethod
    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state produced by ``state_dict`` into a freshly attached model."""

    # --- carrying forward / merging ------------------------------------------------
    def finish_stage(self, model: nn.Module) -> nn.Module:
        """What carries into the next stage. Default: merge into the weights."""
        return self.merge(model)

    @abstractmethod
    def merge(self, model: nn.Module) -> nn.Module:
        """Absorb the adaptation into the weights; return a plain HF model."""

    # --- sharded training (gain_cli.training.sharding) -------------------------------
    def check_shardable(self) -> None:
        """A one-line GainError when the method cannot train with sharded parameters."""
        if self.sharding_refusal:
            raise GainError(f"method '{self.name}' cannot train sharded (train.sharding=fsdp|zero3): {self.sharding_refusal}; "
                            "use train.sharding=none (one process or data parallel)")

    def open_sharded_stage(self, model: nn.Module) -> None:
        """Start a stage on a model that is attached and sharded: the trainable parts get the values a fresh
        ``attach`` would give them (same random draws) and train. The modules stay as they are."""
        self.check_shardable()

    def close_sharded_stage(self, model: nn.Module) -> None:
        """End a stage on a sharded model: fold the trained parts into the local weight shards (no weight is
        gathered) and set them back to the identity, so the model computes what the merged model computes."""
        self.check_shardable()

    # --- information --------------------------------------------------------------
    def count_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters(model))

    # True: the method trains the model's own weights (full FT): nothing is added, and train.sharding=auto shards it
    trains_every_weight: ClassVar[bool] = False

    def table_trainable(self, model: nn.Module) -> int:
        """Trainable parameters counted from the architecture table on an unattached (meta) skeleton: the memory
        estimate's fallback when attaching on meta tensors fails."""
        raise GainError(f"memory estimate: no architecture-table rule for method kind '{self.kind}'")

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        """(the method's own parameter count, a human formula for it) on an attached model.

        Used by ``gain info params`` (``gain_cli.methods.params``); works on meta-device skeletons.
        """
        n = self.count_trainable(model)
        return n, f"{n:,} trainable parameters"


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def check_state_keys(method: Method, expected: set[str], got: Mapping[str, Any]) -> None:
    missing, extra = expected - set(got), set(got) - expected
    if missing or extra:
        raise GainError(
            f"saved {method.name} state does not fit this model: "
            f"{len(missing)} missing key(s) (e.g. {sorted(missing)[:2]}), {len(extra)} unexpected (e.g. {sorted(extra)[:2]})"
        )


def layer_of(name: str, spec: ArchSpec) -> tuple[int, str] | None:
    """``(layer index, path inside the layer)`` of a module name like ``[prefix.]model.layers.3.self_attn.o_proj``."""
    key = f"{spec.layers}."
    pos = name.find(key)
    if pos < 0 or (pos > 0 and name[pos - 1] != "."):
        return None
    idx, _, rest = name[pos + len(key):].partition(".")
    return (int(idx), rest) if idx.isdigit() else None


def per_layer_formula(spec: ArchSpec, entries: list[tuple[str, str, int]], prefix: str = "") -> str:
    """A human count formula from ``(module name, term, count)`` entries, e.g.
    ``36 layers × (1,280 (attn) + 5,120 (ffn)) = 230,400``; irregular layers are summed instead."""
    total = sum(n for _, _, n in entries)
    layers: dict[int, list[tuple[str, str, int]]] = {}
    other: list[tuple[str, str, int]] = []
    for name, term, n in entries:
        where = layer_of(name, spec)
        if where is None:
            other.append((name, term, n))
        else:
            layers.setdefault(where[0], []).append((where[1], term, n))
    rows = [layers[k] for k in sorted(layers)]
    parts = []
    if rows and all(r == rows[0] for r in rows):
        terms = [f"{term} ({path})" for path, term, _ in rows[0]]
        inner = terms[0] if len(terms) == 1 else "(" + " + ".join(terms) + ")"
        parts.append(f"{len(rows)} layers × {prefix}{inner}")
    elif rows:
        parts.append(f"Σ over {len(rows)} layers ({sum(n for r in rows for *_, n in r):,})")
    parts += [f"{term} ({name})" for name, term, _ in other]
    return (" + ".join(parts) or "0") + f" = {total:,}"
