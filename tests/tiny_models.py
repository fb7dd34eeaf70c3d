"""Tiny fp32 causal LMs built from configs (no downloads), one per architecture family.

``tiny_model("llama")`` → a 2-layer LlamaForCausalLM with hidden size 32, vocabulary 300, no dropout,
eval mode, eager attention, seeded init. Weights use a larger init scale (0.2) than the HF
default so that small changes of the weights visibly change the logits.
"""

from __future__ import annotations

import contextlib

import torch

VOCAB = 300
HIDDEN = 32
INTER = 48

_COMMON_DECODER = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128)

TINY_CONFIGS: dict[str, dict] = {
    # GPT-2: Conv1D projections (weights stored (in, out)), tied embeddings
    "gpt2": dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, n_inner=INTER,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True),
    "llama": dict(_COMMON_DECODER, num_key_value_heads=2, tie_word_embeddings=True, attention_dropout=0.0),
    "qwen2": dict(_COMMON_DECODER, num_key_value_heads=2, tie_word_embeddings=False, attention_dropout=0.0),
    "qwen3": dict(_COMMON_DECODER, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    "mistral": dict(_COMMON_DECODER, num_key_value_heads=2, tie_word_embeddings=False),
    "gemma": dict(_COMMON_DECODER, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),  # heads·head_dim ≠ hidden
    "gemma2": dict(_COMMON_DECODER, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "gemma3_text": dict(_COMMON_DECODER, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "phi": dict(_COMMON_DECODER, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False),
    "phi3": dict(_COMMON_DECODER, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                 tie_word_embeddings=False),
    "gpt_neox": dict(_COMMON_DECODER, attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False),
    "stablelm": dict(_COMMON_DECODER, num_key_value_heads=2, attention_dropout=0.0, hidden_dropout=0.0,
                     tie_word_embeddings=False),
    "olmo": dict(_COMMON_DECODER, num_key_value_heads=2, attention_dropout=0.0, tie_word_embeddings=False),
    # Falcon-7B's layout: one fused query_key_value with multi-query attention, attention and MLP in parallel
    "falcon": dict(hidden_size=HIDDEN, ffn_hidden_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                   multi_query=True, parallel_attn=True, bias=False, alibi=False, hidden_dropout=0.0,
                   attention_dropout=0.0, tie_word_embeddings=True),
    # OPT: a decoder under model.decoder, fc1/fc2 directly in the layer
    "opt": dict(hidden_size=HIDDEN, ffn_dim=INTER, word_embed_proj_dim=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, tie_word_embeddings=True),
    # GPT-J: GPT-2's key names with nn.Linear projections and rotary embeddings on part of each head
    "gptj": dict(n_embd=HIDDEN, n_inner=INTER, n_layer=2, n_head=4, n_positions=128, rotary_dim=4,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False),
}

MODEL_TYPES = tuple(TINY_CONFIGS)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for '{model_type}' (have: {', '.join(TINY_CONFIGS)})")
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                initializer_range=0.2, **TINY_CONFIGS[model_type])


def tiny_method(name: str, model_type: str = "llama", **changes):
    """The method ``name`` as shipped (``configs/method/<name>.yaml``, with ``changes``) for a tiny ``model_type``."""
    from omegaconf import OmegaConf

    from gain_cli.architectures import arch_for
    from gain_cli.config import compose_config
    from gain_cli.methods import build_method

    cfg = OmegaConf.to_container(compose_config([f"method={name}"], "tiny_8domains").method, resolve=True)
    return build_method({**cfg, **changes}, arch_for(model_type))


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised ``*ForCausalLM`` of ``model_type`` in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: tiny matmuls are ~50x slower with 2 threads on a busy shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
