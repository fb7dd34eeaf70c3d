"""Model FLOPs per token: what a run's training and evaluation compute, counted from the model's matmul weights.

FLOPs are counted per token for every matrix multiply (``nn.Linear`` and GPT-2 ``Conv1D``, the LM head included,
LoRA's adapter matrices included; the embedding lookup is not a matmul):

  forward            2·N                    N = Σ in·out over the matmul weights
  backward, inputs   2·N                    an upper bound: autograd also skips the input-grads below the first
                                            trainable weight (layer 0's q/k/v when the embedding is frozen, < 1 %)
  backward, weights  2·N_trainable          only weights that train; GAIN and LoRA skip the frozen ones — the saving
  attention          4·L·H·d_h·(T+1)/2      QKᵀ and PV over the causal context, forward; ×2 more in backward

Used by ``gain bench`` (model-FLOPs utilisation) and by every run (``timing.json``: the FLOPs of each phase).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gain_cli.architectures import is_projection, projection_shape, text_config


def matmul_shapes(model: nn.Module) -> list[tuple[int, int, bool]]:
    """(in_features, out_features, trainable) of every matmul weight of the model (each occurrence)."""
    return [(*projection_shape(mod), bool(mod.weight.requires_grad)) for mod in model.modules() if is_projection(mod)]


def attention_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward FLOPs per token of the attention scores and the weighted sum (causal: mean context (T+1)/2)."""
    cfg = text_config(config)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
    return 4.0 * layers * heads * head_dim * (seq_len + 1) / 2.0


def flops_per_token(model: nn.Module, seq_len: int, *, training: bool) -> dict[str, float]:
    """Model FLOPs per token (see the module doc); ``training=False``: the forward only."""
    shapes = matmul_shapes(model)
    n = float(sum(i * o for i, o, _ in shapes))
    n_train = float(sum(i * o for i, o, t in shapes if t))
    attn = attention_flops_per_token(model.config, seq_len)
    if not training:
        return {"forward": 2 * n + attn, "total": 2 * n + attn, "matmul_params": n, "trainable_matmul_params": n_train}
    fwd, bwd_in, bwd_w = 2 * n + attn, 2 * n + 2 * attn, 2 * n_train
    return {"forward": fwd, "backward_inputs": bwd_in, "backward_weights": bwd_w, "total": fwd + bwd_in + bwd_w,
            "matmul_params": n, "trainable_matmul_params": n_train,
            "weight_grad_skipped_fraction": round(1 - n_train / n, 4) if n else 0.0}


class ForwardCounter:
    """Counts the tokens and forward FLOPs of every call of ``model`` inside a ``with`` block (a forward pre-hook:
    lm-eval's batches, padding included, each at its own sequence length)."""

    def __init__(self, model: nn.Module):
        self.model, self.tokens, self.flops, self._handle = model, 0, 0.0, None
        self._n = float(sum(i * o for i, o, _ in matmul_shapes(model)))

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not hasattr(ids, "shape") or ids.dim() != 2:
            return
        n = int(ids.numel())
        self.tokens += n
        self.flops += n * (2 * self._n + attention_flops_per_token(self.model.config, int(ids.shape[1])))

    def __enter__(self) -> "ForwardCounter":
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
