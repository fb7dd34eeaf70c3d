"""IMSM: the siamese scheme of "Interweaving Memories of a Siamese Large Language Model".

Source: Song, Xue, He, Liu, Lu, AAAI 2025, arXiv 2412.17383, and its public code
(github.com/ECNU-Text-Computing/IMSM, ``siamese_model.py``, the query-aware gate, ``mode == 5``).

Two branches see the same tokens:

* the **frozen** branch: a deep copy of the model that enters stage 1 (the pretrained model),
  never trained;
* the **tuned** branch: the same model with a PEFT adapter (``backbone: lora`` by default, or
  ``ia3``) that trains.

Each branch gives its final hidden state (after the final norm, before the LM head) per token:
h_f (frozen) and h_t (tuned), each of size d. The gate, the formula implemented here::

    q_f[t] = mean_{s ≤ t} h_f[s]        q_t[t] = mean_{s ≤ t} h_t[s]        (causal running means)
    g      = sigmoid( B · A · [q_f; h_f; h_t; q_t] )     A: 4d → r,  B: r → d,  no biases,
                                                          dropout (gate_dropout) after A and after B
    h      = g ⊙ h_f + (1 − g) ⊙ h_t
    logits = LM-head_frozen(h)                            (Gemma-2/3 final logit soft-capping applied)

The gate has 5·d·r parameters (r = ``gate_rank``, default 8; 163,840 at d = 4096, the paper's
0.164M) and is computed in fp32 (as in the original, which casts the concatenation to float);
A and B use PyTorch's default ``nn.Linear`` initialisation, as in the original code.

**Deviation from the original (documented):** the original averages the final hidden states
over the *prompt* (query) tokens only, q = mean over the query positions, the same vector for
every position of an instruction-tuning example. Causal-LM training on packed text has no
prompt/answer split, and a mean over the whole sequence would let position t see the future.
We therefore use the causal running mean over the positions ≤ t (padding positions from
``attention_mask`` excluded), so the model stays a proper causal LM whose per-token loss and
perplexity are well defined.

Across stages: ``finish_stage`` merges the stage's adapter into the tuned branch
(``merge_and_unload``) and keeps the gate; ``attach`` on an existing ``SiameseLM`` adds a fresh
adapter to the tuned branch and trains it together with the same gate. The frozen branch stays
the stage-1 input model. The stage state is the adapter (keys ``tuned.…``) plus the gate (keys
``gate.…``); replaying the stages' states rebuilds the model. IMSM cannot be merged into one
plain model: evaluation runs both branches (``mergeable = False``; ``merge`` raises).

Config (``configs/method/imsm.yaml``): backbone (lora | ia3), r, alpha, dropout, target_modules
(LoRA; null = the architecture table's defaults), feedforward_modules ((IA)³), gate_rank,
gate_dropout, lr, weight_decay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from gain_cli.architectures import logit_softcap
from gain_cli.errors import GainError
from gain_cli.methods.base import Method, check_state_keys, freeze, register
from gain_cli.methods.ia3 import ia3_config
from gain_cli.methods.lora import (
    LoraConfig,
    adapter_formula,
    attach_peft,
    check_peft_targets,
    load_peft_state,
    lora_config,
    peft_state,
)
from gain_cli.schemas.typed import at_least, between, section, setting

BACKBONES = ("lora", "ia3")


def causal_mean(h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Running mean over positions ≤ t (batch, seq, d), in fp32; masked positions do not count."""
    h = h.float()
    if attention_mask is None:
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        return h.cumsum(dim=1) / counts
    m = attention_mask.to(h.dtype)[:, :, None]
    return (h * m).cumsum(dim=1) / m.cumsum(dim=1).clamp(min=1.0)


class SiameseGate(nn.Module):
    """g = sigmoid(B·A·[q_f; h_f; h_t; q_t]), A: 4d→r, B: r→d, no bias, dropout after each (fp32)."""

    def __init__(self, hidden: int, rank: int = 8, dropout: float = 0.0, device=None):
        super().__init__()
        self.A = nn.Linear(4 * hidden, rank, bias=False, device=device, dtype=torch.float32)
        self.B = nn.Linear(rank, hidden, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q_f: torch.Tensor, h_f: torch.Tensor, h_t: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([q_f.float(), h_f.float(), h_t.float(), q_t.float()], dim=-1)
        return torch.sigmoid(self.dropout(self.B(self.dropout(self.A(x)))))


def _backbone(lm: nn.Module) -> nn.Module:
    """The transformer body (embeddings … final norm) of a causal LM or of a PeftModel around one."""
    if hasattr(lm, "get_base_model"):  # PeftModel
        lm = lm.get_base_model()
    body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise GainError(f"IMSM cannot find the transformer body of {type(lm).__name__} (no base_model_prefix)")
    return body


class SiameseLM(nn.Module):
    """The IMSM model: frozen + tuned branches, gate, frozen LM head. Quacks like a HF causal LM.

    ``forward(input_ids, attention_mask=None, labels=None, **kw)`` returns a ``CausalLMOutput``
    (``loss`` = mean next-token cross-entropy over labels ≠ -100, HF-style shift; ``logits``).
    """

    main_input_name = "input_ids"

    def __init__(self, frozen: nn.Module, tuned: nn.Module, gate: SiameseGate, logit_softcap: float | None = None):
        super().__init__()
        self.frozen = frozen
        self.tuned = tuned
        self.gate = gate
        self.logit_softcap = logit_softcap  # the head's final-logit soft-capping (Gemma 2/3), as the HF model does

    # -- what HF / lm-eval callers look at --
    @property
    def config(self):
        return self.frozen.config

    @property
    def name_or_path(self) -> str:
        return getattr(self.frozen, "name_or_path", "") or ""

    @property
    def device(self) -> torch.device:
        return self.frozen.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.frozen.get_output_embeddings().weight.dtype

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """No-op: each branch keeps its own (already tied) weights."""

    def can_generate(self) -> bool:
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.frozen.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.frozen.get_output_embeddings()

    @property
    def is_peft_attached(self) -> bool:
        return hasattr(self.tuned, "get_base_model")

    # -- the computation --
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_f, h_t): final (post-norm) hidden states of the frozen and tuned branches."""
        kw = {k: v for k, v in kw.items() if k not in ("use_cache", "return_dict", "output_hidden_states",
                                                        "output_attentions", "past_key_values")}
        with torch.no_grad():
            h_f = _backbone(self.frozen)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                         **kw).last_hidden_state
        h_t = _backbone(self.tuned)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    **kw).last_hidden_state
        return h_f, h_t

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kw: Any) -> CausalLMOutput:
        h_f, h_t = self.hidden_states(input_ids, attention_mask, **kw)
        g = self.gate(causal_mean(h_f, attention_mask), h_f, h_t, causal_mean(h_t, attention_mask))
        h = g * h_f.float() + (1.0 - g) * h_t.float()
        head = self.frozen.get_output_embeddings()
        logits = head(h.to(head.weight.dtype))
        cap = self.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            shift = logits[:, :-1, :].float()
            target = labels[:, 1:].to(shift.device)
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


@section("method")
class ImsmConfig(LoraConfig):
    backbone: str = setting("lora", "the PEFT method of the tuned branch", choices=BACKBONES)
    feedforward_modules: Any = setting(None, "ia3 backbone only: PEFT's feedforward modules among the targets")
    gate_rank: int = setting(8, "rank of the gate's B·A (the IMSM paper's code: 8)", check=at_least(1))
    gate_dropout: float = setting(0.0, "dropout inside the gate", check=between(0, 1, "a probability in [0, 1)",
                                                                                open_hi=True))


@register("imsm", config=ImsmConfig)
class Imsm(Method):
    mergeable = False
    sharding_refusal = ("it runs two copies of the model (a frozen one and a tuned one) joined by a gate outside "
                        "the decoder layers, which FSDP's per-layer units do not cover")

    def __init__(self, cfg: Mapping[str, Any] | ImsmConfig, spec):
        super().__init__(cfg, spec)
        self.backbone, self.gate_rank, self.gate_dropout = self.cfg.backbone, self.cfg.gate_rank, self.cfg.gate_dropout

    def peft_config(self):
        if self.backbone == "ia3":
            return ia3_config(self.cfg, self.spec)
        return lora_config(self.cfg, self.spec)

    def check_model(self, model: nn.Module) -> None:
        check_peft_targets(model, self.peft_config(), self.name)

    def attach(self, model: nn.Module) -> nn.Module:
        if isinstance(model, SiameseLM):  # a later stage: fresh adapter on the tuned branch, same gate
            if model.is_peft_attached:
                raise GainError("IMSM is already attached to this model (finish_stage first)")
            freeze(model)
            model.tuned = attach_peft(model.tuned, self.peft_config(), self.name)
            model.gate.requires_grad_(True)
            return model
        if hasattr(model, "get_base_model"):
            raise GainError("IMSM needs a plain causal LM (or an IMSM model), not a PeftModel")
        freeze(model)
        frozen = copy.deepcopy(model).eval()
        head = model.get_output_embeddings()
        gate = SiameseGate(head.weight.shape[1], self.gate_rank, self.gate_dropout, device=head.weight.device)
        tuned = attach_peft(model, self.peft_config(), self.name)
        return SiameseLM(frozen, tuned, gate, logit_softcap(frozen.config, self.spec))

    def _siamese(self, model: nn.Module) -> SiameseLM:
        if not isinstance(model, SiameseLM):
            raise GainError(f"IMSM expects its SiameseLM model, got {type(model).__name__} (attach first)")
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = self._siamese(model)
        out = {f"tuned.{k}": v for k, v in peft_state(m.tuned).items()}
        out.update({f"gate.{k}": v.detach().float().cpu().clone() for k, v in m.gate.state_dict().items()})
        return out

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        m = self._siamese(model)
        if not m.is_peft_attached:
            raise GainError("IMSM state can only be loaded into a freshly attached model (attach first)")
        gate_keys = {f"gate.{k}" for k in m.gate.state_dict()}
        tuned_state = {k[len("tuned."):]: v for k, v in state.items() if k.startswith("tuned.")}
        rest = {k: v for k, v in state.items() if not k.startswith("tuned.")}
        check_state_keys(self, gate_keys, rest)
        load_peft_state(self, m.tuned, tuned_state)
        with torch.no_grad():
            for k, p in m.gate.state_dict().items():
                v = state[f"gate.{k}"]
                if tuple(v.shape) != tuple(p.shape):
                    raise GainError(f"saved {self.name} state: gate.{k} has shape {tuple(v.shape)}, "
                                    f"the model needs {tuple(p.shape)} (method.gate_rank?)")
                p.copy_(v.to(p.device, p.dtype))

    def finish_stage(self, model: nn.Module) -> nn.Module:
        m = self._siamese(model)
        if m.is_peft_attached:
            m.tuned = m.tuned.merge_and_unload()
        freeze(m)
        return m

    def merge(self, model: nn.Module) -> nn.Module:
        raise GainError(f"method '{self.name}' (IMSM) cannot be merged into a single plain model: it mixes the "
                        "hidden states of a frozen and a tuned branch per token, so evaluation runs both branches "
                        "(use `gain eval --run RUN_DIR` instead of `gain merge`)")

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        m = self._siamese(model)
        n_adapter, formula = adapter_formula(m.tuned, self.spec)
        d, r = m.gate.B.out_features, m.gate.A.out_features
        n_gate = m.gate.A.weight.numel() + m.gate.B.weight.numel()
        head = formula.rsplit(" = ", 1)[0]
        return n_adapter + n_gate, (f"{self.backbone}: {head} + gate 5·d·r = 5·{d:,}·{r} = {n_gate:,} "
                                    f"→ {n_adapter + n_gate:,} (plus a frozen copy of the model)")
