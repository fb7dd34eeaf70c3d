"""DoRA (PEFT's use_dora): the maths written out by hand, its parameter formula, its refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_models import one_thread, tiny_ids, tiny_model

from gain_cli.architectures import arch_for
from gain_cli.errors import GainError
from gain_cli.methods import build_method

CFG = {"name": "dora", "kind": "dora", "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _perturbed(seed: int = 0):
    method = build_method(CFG, arch_for("llama"))
    model = method.attach(tiny_model("llama"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return method, model


def test_merged_weight_is_magnitude_times_unit_rows_of_the_lora_updated_weight():
    """W' = m ⊙ (W + (α/r)·B·A) / ‖W + (α/r)·B·A‖ (row-wise), the weight PEFT's merge writes."""
    method, model = _perturbed()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    w = q.base_layer.weight.detach().clone()
    a, b = q.lora_A["default"].weight.detach(), q.lora_B["default"].weight.detach()
    m = q.lora_magnitude_vector["default"].weight.detach()
    updated = w + (8 / 4) * b @ a
    want = m[:, None] * updated / updated.norm(dim=1, keepdim=True)
    ids = tiny_ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = method.merge(model)
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, want, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_dora_is_not_lora_with_the_same_adapter():
    """The magnitude matters: the same A and B give LoRA another function once m moves off ‖W‖."""
    method, model = _perturbed()
    lora = build_method({**CFG, "name": "lora", "kind": "lora"}, arch_for("llama"))
    other = lora.attach(tiny_model("llama"))
    state = {k: v for k, v in method.state_dict(model).items() if "magnitude" not in k}
    lora.load_state_dict(other, state)
    ids = tiny_ids()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max() > 1e-3


def test_parameter_formula_counts_the_magnitudes():
    method = build_method(CFG, arch_for("llama"))
    model = method.attach(tiny_model("llama"))
    n, formula = method.param_summary(model)
    # q, o: 32 → 32; k, v: 32 → 16 (2 of 4 heads); r = 4; one magnitude per output row
    per_layer = 2 * (4 * (32 + 32) + 32) + 2 * (4 * (32 + 16) + 16)
    assert n == method.count_trainable(model) == 2 * per_layer == 1_984
    assert formula.startswith("2 layers × (4·(32+32)+32 (self_attn.q_proj)") and formula.endswith("= 1,984")


def test_sharded_training_is_refused_in_one_line():
    with pytest.raises(GainError, match="cannot train sharded.*magnitude"):
        build_method(CFG, arch_for("llama")).check_shardable()
