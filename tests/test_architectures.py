"""The architecture table against the real transformers module names, one tiny model per model type."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, one_thread, tiny_ids, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from gain_cli.architectures import (ARCHITECTURES, arch_for, decoder_layers, get_submodule, hidden_size,
                                    intermediate_size, is_transposed, logit_softcap, num_layers)
from gain_cli.errors import GainError
from gain_cli.methods import build_method
from gain_cli.methods.gain import GainWrapper, in_features


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def test_every_table_row_has_a_tiny_model():
    assert set(ARCHITECTURES) == set(MODEL_TYPES)


def _out_features(mod: nn.Module) -> int:
    return mod.weight.shape[1] if isinstance(mod, Conv1D) else mod.weight.shape[0]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_row_matches_transformers_modules(model_type):
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    cfg = model.config
    layers = decoder_layers(model, spec)
    assert len(layers) == num_layers(cfg, spec) == 2
    heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or hidden_size(cfg, spec) // heads
    for layer in layers:
        attn, ffn = get_submodule(layer, spec.attn_out), get_submodule(layer, spec.ffn_down)
        assert isinstance(attn, (nn.Linear, Conv1D)) and isinstance(ffn, (nn.Linear, Conv1D))
        # attention output projection: input = concatenated heads, output = residual stream
        assert in_features(attn) == heads * head_dim
        assert _out_features(attn) == hidden_size(cfg, spec)
        # FFN down projection: input = intermediate activations, output = residual stream
        assert in_features(ffn) == intermediate_size(cfg, spec) == 48
        assert _out_features(ffn) == hidden_size(cfg, spec) == 32
        assert isinstance(attn, Conv1D) == (model_type == "gpt2")
        assert is_transposed(attn) == is_transposed(ffn) == spec.transposed_weights  # the row says the layout
    # every LoRA target suffix names at least one projection in every layer
    for layer in layers:
        names = [n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        for t in spec.lora_targets:
            assert any(n == t or n.endswith("." + t) for n in names), (model_type, t, names)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gain_ffn_and_imsm_work_on_every_architecture(model_type):
    """GAIN-FFN wraps exactly 2 modules per layer, is the identity at init, and merges exactly;
    IMSM reproduces the plain model's logits at init (h_f = h_t) for every architecture."""
    ids = tiny_ids()
    model = tiny_model(model_type)
    spec = arch_for(model_type)
    with torch.no_grad():
        ref = model(ids).logits
    m = build_method({"name": "gain_ffn", "kind": "gain", "modules": ["attn", "ffn"]}, spec)
    model = m.attach(model)
    assert len(m.wrappers(model)) == 4
    assert all(isinstance(w, GainWrapper) for w in m.wrappers(model).values())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-6)
        for w in m.wrappers(model).values():
            w.gain.copy_(1 + 0.3 * torch.randn(w.gain.shape, generator=torch.Generator().manual_seed(1)))
        adapted = model(ids).logits
    assert (adapted - ref).abs().max() > 1e-2
    merged = m.merge(model)
    assert not any(isinstance(x, GainWrapper) for x in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)

    imsm = build_method({"name": "imsm", "kind": "imsm", "r": 2, "gate_rank": 2}, spec)
    siamese = imsm.attach(tiny_model(model_type))
    with torch.no_grad():
        assert torch.allclose(siamese(input_ids=ids).logits, ref, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ia3_defaults_exist_for_every_architecture(model_type):
    spec = arch_for(model_type)
    model = build_method({"name": "ia3", "kind": "ia3"}, spec).attach(tiny_model(model_type))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_unknown_architecture_says_how_to_add_it():
    with pytest.raises(GainError) as e:
        arch_for("mystery_lm")
    msg = str(e.value)
    assert "mystery_lm" in msg and "gain_cli/architectures.py" in msg and "arch_overrides" in msg
    assert "attn_out" in msg and "ffn_down" in msg and "layers" in msg
    with pytest.raises(GainError, match="attn_out"):  # partial overrides are not enough
        arch_for("mystery_lm", {"layers": "model.layers"})
    with pytest.raises(GainError, match="unknown key"):
        arch_for("llama", {"atn_out": "x"})


def test_overrides_describe_an_unknown_architecture():
    """A Llama-shaped model described only by overrides gets the same GAIN parameters."""
    over = {"layers": "model.layers", "attn_out": "self_attn.o_proj", "ffn_down": "mlp.down_proj",
            "lora_targets": ["q_proj", "v_proj"]}
    spec = arch_for("mystery_lm", over)
    assert spec.lora_targets == ("q_proj", "v_proj")
    model = tiny_model("llama")
    m = build_method({"name": "g", "kind": "gain", "modules": ["attn", "ffn"]}, spec)
    m.attach(model)
    assert sorted(m.wrappers(model)) == sorted(f"model.layers.{i}.{p}" for i in range(2)
                                               for p in ("self_attn.o_proj", "mlp.down_proj"))
    lora = build_method({"name": "lora", "kind": "lora", "r": 2}, spec).attach(tiny_model("llama"))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 2 * 2 * ((32 + 32) + (32 + 16))
    with pytest.raises(GainError, match="lora_targets"):
        bare = arch_for("mystery_lm", {k: over[k] for k in ("layers", "attn_out", "ffn_down")})
        build_method({"name": "lora", "kind": "lora"}, bare).attach(tiny_model("llama"))
    with pytest.raises(GainError, match="ia3_targets"):
        build_method({"name": "ia3", "kind": "ia3"}, arch_for("mystery_lm", over)).attach(tiny_model("llama"))


def test_rows_say_where_the_logits_are_soft_capped():
    from tiny_models import tiny_config

    gemma2 = tiny_config("gemma2")
    assert logit_softcap(gemma2, arch_for("gemma2")) == gemma2.final_logit_softcapping > 0
    assert logit_softcap(tiny_config("llama"), arch_for("llama")) is None
