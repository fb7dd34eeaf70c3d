"""Penalties: extra loss terms toward the previous stage that any method can carry.

``method.penalty`` on any method (``null``: none)::

    gain run method=gain_ffn method.penalty=ewc                       # the penalty's defaults below
    gain run method=gain_ffn 'method.penalty={name:l2,lambda:0.5}'     # with its settings

A penalty measures the stage's change in the coordinates the method names (``Method.penalty_weights`` and
``Method.displacements``): for LoRA-family methods the adapter's delta ΔW = scale · B A of each adapted weight (the
distance to the previous merged model, no copy kept); for every other method its trainable parameters minus their
values when the stage started (an anchor copied in ``attach`` and saved with the stage's state): all weights for
full FT, the gain vectors s (which start each stage at ones) for GAIN, the scaling vectors for (IA)³.

* ``l2``: λ · Σ_i (θ_i − θ_prev,i)².
* ``ewc``: λ/2 · Σ_i F_i (θ_i − θ*_i)², F the diagonal empirical Fisher of the finished domains w.r.t. the
  penalised tensors (the base weights of the adapted modules for LoRA), estimated after each stage's training on
  ``fisher_batches`` batches of its own training blocks and accumulated (``fisher_accumulate``: sum | mean).

The ``l2`` and ``ewc`` methods (``configs/method/l2.yaml``, ``ewc.yaml``, ``ewc_lora.yaml``) are these penalties on
full FT or LoRA with their settings at the method's top level; state keys, values and results are theirs.

A penalty is refused for sharded training (it reads whole tensors by name, which FSDP splits over the processes)
and for drift runs (it needs stage boundaries).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from gain_cli.errors import GainError, unknown_choice
from gain_cli.methods.base import PENALTIES, Method, StageContext, check_state_keys, register_penalty
from gain_cli.schemas.typed import Section, at_least, non_negative, section, setting

ACCUMULATE = ("sum", "mean")


def split_state(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(entries under ``prefix`` with the prefix removed, all other entries)."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return own, rest


@section("method.penalty")
class L2PenaltyConfig(Section):
    strength: float = setting(1.0, "λ, the penalty's strength (0: off)", key="lambda", check=non_negative())


@section("method.penalty")
class EwcPenaltyConfig(L2PenaltyConfig):
    strength: float = setting(1.0e6, "λ, the penalty's strength: sweep it (mini-batch Fisher entries are small)",
                              key="lambda", check=non_negative())
    fisher_batches: int = setting(4, "batches of the finished domain's training blocks for the Fisher estimate",
                                  check=((lambda v: v >= 1), ">= 1"))
    fisher_batch_size: int | None = setting(None, "sequences per Fisher batch (null: train.batch_size)",
                                            check=at_least(1))
    fisher_accumulate: str = setting("sum", "sum: F += F_k (online EWC) | mean: running mean over the finished "
                                     "domains", choices=ACCUMULATE)


class Penalty:
    """A loss term toward the previous stage, carried by a host method (hooks called by :class:`Penalized`)."""

    name: ClassVar[str] = ""
    prefixes: ClassVar[tuple[str, ...]] = ()  # its keys in the stage state
    config: ClassVar[type[L2PenaltyConfig]] = L2PenaltyConfig
    boundary_refusal: ClassVar[str] = "it needs stage boundaries"

    def __init__(self, cfg: Mapping[str, Any] | L2PenaltyConfig, host: Method, prefix: str = "method.penalty"):
        self.cfg = self.config.of(cfg, prefix)
        self.host = host
        self.lam = float(self.cfg.strength)

    @property
    def active(self) -> bool:
        return self.lam > 0

    def sharding_refusal(self) -> str | None:
        if not self.active:
            return None
        return (f"its {self.name} penalty reads whole weights / LoRA deltas by name, which FSDP splits over the "
                "processes (or set method.lambda=0)")

    # -- the anchor: the penalised tensors when the stage started (methods whose change is not a delta) --
    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if not self.host.anchored:
            return None
        return {n: p.detach().clone() for n, p in self.host.trainable_parameters(model)}

    def load_anchor(self, model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.host.anchored:
            raise GainError(f"saved {self.host.name} state holds an anchor, but the method's change is a delta "
                            "(method.base is not full_ft)")
        params = dict(self.host.trainable_parameters(model))
        check_state_keys(self.host, set(params), anchor)
        return {n: anchor[n].to(params[n].device, params[n].dtype).clone() for n in params}

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """After the host attached (the stage starts here)."""

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, model: nn.Module, own: dict[str, dict[str, torch.Tensor]]) -> None:
        """``own``: this penalty's entries of a saved state, per prefix (prefix removed)."""

    def stage_info(self) -> dict[str, Any]:
        return {}


@register_penalty("l2")
class L2Penalty(Penalty):
    prefixes = ("l2_anchor/",)
    boundary_refusal = "it needs stage boundaries: its penalty pulls toward the weights the previous stage ended with"

    def __init__(self, cfg: Mapping[str, Any] | L2PenaltyConfig, host: Method, prefix: str = "method.penalty"):
        super().__init__(cfg, host, prefix)
        self.anchor: dict[str, torch.Tensor] | None = None
        self._final: float | None = None

    def attach(self, model: nn.Module) -> None:
        self.anchor = self.snapshot(model) if self.active else None

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        d = self.host.displacements(model, self.anchor)
        if not d:
            return None
        return self.lam * sum((x ** 2).sum() for x in d.values())

    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        with torch.no_grad():
            pen = self.loss(model)
        self._final = None if pen is None else float(pen)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.anchor is None:
            return {}
        return {self.prefixes[0] + n: t.detach().cpu().clone() for n, t in self.anchor.items()}

    def load_state_dict(self, model: nn.Module, own: dict[str, dict[str, torch.Tensor]]) -> None:
        anchor = own[self.prefixes[0]]
        if anchor:
            self.anchor = self.load_anchor(model, anchor)

    def stage_info(self) -> dict[str, Any]:
        return {"l2": {"base": self.host.kind, "lambda": self.lam, "final_penalty": self._final}}


@register_penalty("ewc")
class EwcPenalty(Penalty):
    prefixes = ("ewc_fisher/", "ewc_anchor/", "ewc_meta/")
    config = EwcPenaltyConfig
    boundary_refusal = ("it needs stage boundaries: its penalty anchors the weights where each finished domain's "
                        "stage ended, weighted by a Fisher estimate on that domain's data")

    def __init__(self, cfg: Mapping[str, Any] | EwcPenaltyConfig, host: Method, prefix: str = "method.penalty"):
        super().__init__(cfg, host, prefix)
        self.accumulate, self.fisher_batches = self.cfg.fisher_accumulate, self.cfg.fisher_batches
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.n_domains = 0
        self._info: dict[str, Any] = {}

    def sharding_refusal(self) -> str | None:
        return ("its Fisher estimate needs per-weight gradients of whole weights and its penalty reads whole "
                "weights / LoRA deltas by name, which FSDP splits over the processes")

    def attach(self, model: nn.Module) -> None:
        # the anchor is the model this stage starts from (only needed once there is a Fisher)
        self.anchor = self.snapshot(model) if self.fisher is not None else None

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.fisher is None or self.lam == 0.0:
            return None
        d = self.host.displacements(model, self.anchor)
        if not d:  # an anchored method with a Fisher but no anchor: only after loading a final (non-training) state
            return None
        return 0.5 * self.lam * sum((self.fisher[n] * x ** 2).sum() for n, x in d.items())

    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        with torch.no_grad():
            pen = self.loss(model)  # the stage's final penalty (for choosing λ), before the Fisher grows
        est = self.estimate_fisher(model, ctx)
        if self.fisher is None:
            self.fisher, self.n_domains = est, 1
        else:
            n = self.n_domains
            if self.accumulate == "sum":
                self.fisher = {k: self.fisher[k] + est[k] for k in est}
            else:
                self.fisher = {k: (self.fisher[k] * n + est[k]) / (n + 1) for k in est}
            self.n_domains = n + 1
        self._info = {
            "base": self.host.kind, "lambda": self.lam, "fisher_batches": self.fisher_batches,
            "fisher_accumulate": self.accumulate, "fisher_domains": self.n_domains,
            "fisher_values": int(sum(v.numel() for v in self.fisher.values())),
            "final_penalty": None if pen is None else float(pen),
            "fisher_mean_this_domain": float(sum(v.sum() for v in est.values()) / max(1, sum(v.numel() for v in est.values()))),
        }

    def estimate_fisher(self, model: nn.Module, ctx: StageContext) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the stage's domain w.r.t. the host's penalised tensors: per batch the
        gradient of the mean-token LM loss (labels = inputs), squared element-wise, averaged over the batches, in
        fp32, in eval mode; the batches drawn from the stage's training blocks with a generator seeded by (seed,
        stage). Every process computes the same batches, so the estimate needs no communication."""
        seq_len = int(ctx.train_cfg["seq_len"])
        bs = int(self.cfg.fisher_batch_size or ctx.train_cfg["batch_size"])
        blocks = ctx.data.blocks(ctx.domain, "train", seq_len)
        need = self.fisher_batches * bs
        g = torch.Generator().manual_seed(1_000_003 * int(ctx.seed) + int(ctx.stage) + 7_919_000)
        reps = -(-need // blocks.shape[0])
        idx = torch.cat([torch.randperm(blocks.shape[0], generator=g) for _ in range(reps)])[:need]

        targets = self.host.penalty_weights(model)
        if not targets:
            raise GainError(f"method '{self.host.name}': no weights to estimate the Fisher for (no trainable / adapted "
                            "weights)")
        names = list(targets)
        tensors = [targets[n] for n in names]
        flags = [t.requires_grad for t in tensors]
        device = tensors[0].device
        est = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for n, t in targets.items()}
        was_training = model.training
        model.eval()
        try:
            for t in tensors:
                t.requires_grad_(True)
            with torch.enable_grad():
                for b in range(self.fisher_batches):
                    ids = blocks[idx[b * bs:(b + 1) * bs]].to(device)
                    loss = model(input_ids=ids, labels=ids).loss
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for n, gr in zip(names, grads):
                        if gr is not None:
                            est[n] += gr.detach().float() ** 2
        finally:
            for t, f in zip(tensors, flags):
                t.requires_grad_(f)
            model.train(was_training)
        return {n: v / self.fisher_batches for n, v in est.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        fisher, anchor, meta = self.prefixes
        state: dict[str, torch.Tensor] = {}
        if self.fisher is not None:
            state.update({fisher + n: t.detach().float().cpu().clone() for n, t in self.fisher.items()})
            state[meta + "domains"] = torch.tensor([self.n_domains], dtype=torch.int64)
        if self.anchor is not None:
            state.update({anchor + n: t.detach().cpu().clone() for n, t in self.anchor.items()})
        return state

    def load_state_dict(self, model: nn.Module, own: dict[str, dict[str, torch.Tensor]]) -> None:
        fisher, anchor, meta = (own[p] for p in self.prefixes)
        if fisher:
            targets = self.host.penalty_weights(model)
            check_state_keys(self.host, set(targets), fisher)
            self.fisher = {n: fisher[n].to(targets[n].device, torch.float32).clone() for n in targets}
            self.n_domains = int(meta["domains"].reshape(-1)[0]) if "domains" in meta else 1
        else:
            self.fisher, self.n_domains = None, 0
        self.anchor = self.load_anchor(model, anchor) if anchor else None

    def stage_info(self) -> dict[str, Any]:
        return {"ewc": dict(self._info)}


def build_penalty(spec: Any, host: Method, flat: Mapping[str, Any] | None = None) -> Penalty:
    """The penalty ``spec`` names on ``host``: a name (its defaults, or the settings in ``flat``, the method's own
    config for the ``l2`` / ``ewc`` methods) or a mapping ``{name: ..., lambda: ..., ...}``."""
    if isinstance(spec, Mapping):
        settings = dict(spec)
        name = settings.pop("name", None)
        prefix = "method.penalty"
    else:
        name, prefix = spec, "method"
    if name not in PENALTIES:
        raise unknown_choice("method.penalty", name, PENALTIES)
    cls = PENALTIES[name]
    if not isinstance(spec, Mapping):  # the l2 / ewc methods: the penalty's keys among the method's own settings
        settings = cls.config.shared_with(flat or {}, prefix)
    return cls(settings, host, prefix)


class Penalized(Method):
    """A method with a penalty: the method's own hooks, plus the penalty's term, state and stage facts."""

    def __init__(self, inner: Method, penalty: Penalty):
        self.inner, self.penalty = inner, penalty
        self.cfg, self.spec, self.name = inner.cfg, inner.spec, inner.name
        if not type(self).kind:  # a method with a penalty is still that method (the l2 / ewc methods keep theirs)
            self.kind = inner.kind
        self.base = inner.kind
        self.cumulative_state = inner.cumulative_state
        self.mergeable = inner.mergeable
        self.anchored = inner.anchored
        self.trains_every_weight = inner.trains_every_weight
        self.boundary_refusal = penalty.boundary_refusal

    @property
    def lam(self) -> float:
        return self.penalty.lam

    @property
    def sharding_refusal(self) -> str | None:  # type: ignore[override]
        return self.penalty.sharding_refusal() or self.inner.sharding_refusal

    # -- the penalty's hooks --
    def attach(self, model: nn.Module) -> nn.Module:
        model = self.inner.attach(model)
        self.penalty.attach(model)
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        terms = [t for t in (self.inner.regularization(model), self.penalty.loss(model)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def regularizes(self) -> bool:
        return self.inner.regularizes() or self.penalty.active

    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        self.inner.after_training(model, ctx)
        self.penalty.after_training(model, ctx)

    def stage_info(self) -> dict[str, Any]:
        return {**self.inner.stage_info(), **self.penalty.stage_info()}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(model), **self.penalty.state_dict()}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        own, rest = {}, dict(state)
        for prefix in self.penalty.prefixes:
            own[prefix], rest = split_state(rest, prefix)
        self.inner.load_state_dict(model, rest)
        self.penalty.load_state_dict(model, own)

    # -- the method's own --
    def check_model(self, model: nn.Module) -> None:
        self.inner.check_model(model)

    def open_sharded_stage(self, model: nn.Module) -> None:
        self.check_shardable()
        self.inner.open_sharded_stage(model)

    def close_sharded_stage(self, model: nn.Module) -> None:
        self.inner.close_sharded_stage(model)

    def stage_blocks(self, ctx: StageContext) -> torch.Tensor:
        return self.inner.stage_blocks(ctx)

    def training_order(self, n_blocks: int, n_needed: int, seed: int, stage: int) -> torch.Tensor | None:
        return self.inner.training_order(n_blocks, n_needed, seed, stage)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return self.inner.trainable_parameters(model)

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return self.inner.optimizer_groups(model)

    def penalty_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.inner.penalty_weights(model)

    def displacements(self, model: nn.Module, anchor) -> dict[str, torch.Tensor]:
        return self.inner.displacements(model, anchor)

    def finish_stage(self, model: nn.Module) -> nn.Module:
        return self.inner.finish_stage(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return self.inner.merge(model)

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        return self.inner.param_summary(model)

    def table_trainable(self, model: nn.Module) -> int:
        return self.inner.table_trainable(model)
