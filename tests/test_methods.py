"""Every method on tiny GPT-2 (Conv1D), Llama (tied embeddings) and Qwen2 (q/k/v biases) models:
exactly the promised parameters train, merges are exact, states round-trip, GAIN = PEFT (IA)3 with
the same modules as feedforward modules, Proposition 1, IMSM's siamese model across two stages."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import one_thread, tiny_ids, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from gain_cli.architectures import arch_for, get_submodule
from gain_cli.errors import GainError
from gain_cli.io import atomic_save_safetensors
from gain_cli.methods import METHOD_KINDS, build_method
from gain_cli.methods.gain import GainWrapper
from gain_cli.methods.imsm import SiameseLM, causal_mean

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

MODELS = ("gpt2", "llama", "qwen2")
L, HIDDEN, INTER = 2, 32, 48  # tiny_models: 2 layers, hidden 32 (= heads·head_dim), FFN 48

METHODS = {
    "gain_attn": {"name": "gain_attn", "kind": "gain", "modules": ["attn"], "parametrization": "plain"},
    "gain_ffn": {"name": "gain_ffn", "kind": "gain", "modules": ["attn", "ffn"], "parametrization": "plain"},
    "gain_ffn_exp": {"name": "gain_ffn_exp", "kind": "gain", "modules": ["attn", "ffn"], "parametrization": "exp"},
    "lora": {"name": "lora", "kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"name": "dora", "kind": "dora", "r": 4, "alpha": 8, "dropout": 0.0},
    "ia3": {"name": "ia3", "kind": "ia3", "target_modules": None, "feedforward_modules": None},
    "full_ft": {"name": "full_ft", "kind": "full_ft"},
    "imsm": {"name": "imsm", "kind": "imsm", "backbone": "lora", "r": 4, "alpha": 8, "gate_rank": 2},
    "imsm_ia3": {"name": "imsm_ia3", "kind": "imsm", "backbone": "ia3", "gate_rank": 2},
}
MERGEABLE = ("gain_attn", "gain_ffn", "gain_ffn_exp", "lora", "dora", "ia3")

LAYERS = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers"}
ATTN = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "qwen2": "self_attn.o_proj"}
FFN = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj", "qwen2": "mlp.down_proj"}
# LoRA targets (architecture table) with (in, out) per layer
LORA = {"gpt2": {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32)},
        "llama": {f"self_attn.{x}_proj": (32, 32 if x in "qo" else 16) for x in "qkvo"},
        "qwen2": {f"self_attn.{x}_proj": (32, 32 if x in "qo" else 16) for x in "qkvo"}}
# PEFT's stock (IA)3 defaults: module -> (vector length, feedforward?)
IA3 = {"gpt2": {"attn.c_attn": 96, "mlp.c_proj": 48},
       "llama": {"self_attn.k_proj": 16, "self_attn.v_proj": 16, "mlp.down_proj": 48},
       "qwen2": {"self_attn.q_proj": 32, "self_attn.v_proj": 16, "mlp.down_proj": 48}}
PEFT = "base_model.model."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def method_for(key: str, model_type: str, **extra):
    return build_method({**METHODS[key], **extra}, arch_for(model_type))


def expected_trainable(key: str, model_type: str, model) -> tuple[set[str], int]:
    """The parameter names and count each method promises, written out by hand."""
    layers = [f"{LAYERS[model_type]}.{i}" for i in range(L)]
    if key.startswith("gain"):
        paths = [ATTN[model_type]] + ([FFN[model_type]] if key != "gain_attn" else [])
        n = L * (HIDDEN + (INTER if key != "gain_attn" else 0))  # attn input = 32, FFN down input = 48
        return {f"{lay}.{p}.gain" for lay in layers for p in paths}, n
    lora_names = {f"{PEFT}{lay}.{p}.lora_{ab}.default.weight" for lay in layers for p in LORA[model_type] for ab in "AB"}
    lora_n = L * sum(4 * (i + o) for i, o in LORA[model_type].values())  # r = 4
    ia3_names = {f"{PEFT}{lay}.{p}.ia3_l.default" for lay in layers for p in IA3[model_type]}
    ia3_n = L * sum(IA3[model_type].values())
    gate = {"gate.A.weight", "gate.B.weight"}
    gate_n = 5 * HIDDEN * 2  # A: 4d x r, B: r x d, r = 2
    if key == "lora":
        return lora_names, lora_n
    if key == "dora":  # LoRA's A and B, plus one magnitude per output row of every target
        magnitudes = {f"{PEFT}{lay}.{p}.lora_magnitude_vector.default.weight" for lay in layers for p in LORA[model_type]}
        return lora_names | magnitudes, lora_n + L * sum(o for _, o in LORA[model_type].values())
    if key == "ia3":
        return ia3_names, ia3_n
    if key == "imsm":
        return {f"tuned.{n}" for n in lora_names} | gate, lora_n + gate_n
    if key == "imsm_ia3":
        return {f"tuned.{n}" for n in ia3_names} | gate, ia3_n + gate_n
    assert key == "full_ft"
    names = {n for n, _ in model.named_parameters()}
    return names, sum(p.numel() for p in model.parameters())


def perturb(model, method, seed: int = 0, scale: float = 0.3) -> None:
    """Move every trainable parameter away from its (identity) initialisation: vectors (gains, (IA)3)
    by ``scale``, matrices (LoRA, gate, full FT) by ``scale / 3``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            k = scale if p.dim() == 1 or 1 in p.shape else scale / 3
            p.add_(k * torch.randn(p.shape, generator=g).to(p.dtype))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_steps(model, method, ids, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(method.optimizer_groups(model), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        reg = method.regularization(model)
        if reg is not None:
            loss = loss + reg
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def assert_plain(model) -> None:
    """A plain HF causal LM: no GAIN wrapper, no PEFT layer left."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert isinstance(model, PreTrainedModel) and not isinstance(model, PeftModel)
    assert not any(isinstance(m, (GainWrapper, BaseTunerLayer)) for m in model.modules())


# ---------------------------------------------------------------------------------------------- trainable set

@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("key", ["full_ft", "gain_attn", "gain_ffn", "lora"])
def test_table_count_on_an_unattached_model_equals_the_attached_count(key, model_type):
    """The memory estimate's fallback (Method.table_trainable) counts what attaching trains."""
    method = method_for(key, model_type)
    unattached = method.table_trainable(tiny_model(model_type))
    assert unattached == method.count_trainable(method.attach(tiny_model(model_type)))


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("key", list(METHODS))
def test_exactly_the_promised_parameters_train(key, model_type):
    ids = tiny_ids()
    base = tiny_model(model_type)
    ref = logits(base, ids)
    method = method_for(key, model_type)
    model = method.attach(base)
    names, count = expected_trainable(key, model_type, model)
    trainable = dict(method.trainable_parameters(model))
    assert set(trainable) == names
    assert method.count_trainable(model) == count
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names  # the optimizer sees nothing else
    if key != "full_ft":  # every method starts at the identity: the adapted model = the base model
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # 3 AdamW steps: LoRA's A and IMSM's gate only get a gradient once B / the tuned branch has moved
    train_steps(model, method, ids, steps=3)
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} should be frozen"


def test_gain_gains_have_input_length_and_fp32():
    model = tiny_model("llama")
    m = method_for("gain_ffn", "llama")
    m.attach(model)
    shapes = {n.rsplit(".", 1)[-1]: w.gain.shape for n, w in m.wrappers(model).items()}
    assert shapes == {"o_proj": (HIDDEN,), "down_proj": (INTER,)}
    assert all(w.gain.dtype == torch.float32 for w in m.wrappers(model).values())


def test_gain_module_choices():
    spec = arch_for("llama")
    for modules, expected in [("attn", ["self_attn.o_proj"]), (["ffn"], ["mlp.down_proj"]),
                              ("both", ["self_attn.o_proj", "mlp.down_proj"]),
                              (["self_attn.o_proj", "mlp.up_proj"], ["self_attn.o_proj", "mlp.up_proj"])]:
        model = tiny_model("llama")
        m = build_method({"name": "g", "kind": "gain", "modules": modules}, spec)
        m.attach(model)
        assert sorted(m.wrappers(model)) == sorted(f"model.layers.{i}.{p}" for i in range(L) for p in expected)
    m = build_method({"name": "g", "kind": "gain", "modules": ["mlp.up_proj"]}, spec)
    model = m.attach(tiny_model("llama"))
    assert m.count_trainable(model) == L * HIDDEN  # up_proj input = hidden size
    with pytest.raises(GainError, match="not found"):
        build_method({"name": "g", "kind": "gain", "modules": ["mlp.nope"]}, spec).attach(tiny_model("llama"))
    with pytest.raises(GainError, match="parametrization"):
        build_method({"name": "g", "kind": "gain", "parametrization": "softplus"}, spec)
    with pytest.raises(GainError, match="already attached"):
        m.attach(model)


def test_gain_l2_pull_toward_one():
    for param, init in (("plain", 1.0), ("exp", 0.0)):
        model = tiny_model("qwen2")
        m = method_for("gain_ffn", "qwen2", parametrization=param, l2=0.5)
        m.attach(model)
        assert float(m.regularization(model).detach()) == 0.0  # s = 1 at init
        for w in m.wrappers(model).values():
            assert torch.all(w.gain == init)
        with torch.no_grad():
            for w in m.wrappers(model).values():
                w.gain.fill_(init + 0.1)
        s = 1.1 if param == "plain" else float(torch.exp(torch.tensor(0.1)))
        assert float(m.regularization(model).detach()) == pytest.approx(0.5 * (s - 1) ** 2 * L * (HIDDEN + INTER), rel=1e-5)
    assert method_for("gain_ffn", "qwen2", l2=0.0).regularization(model) is None


# ---------------------------------------------------------------------------------------------- merging

@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("key", MERGEABLE)
def test_merge_equals_adapted_model_and_reloads(key, model_type, tmp_path):
    ids = tiny_ids()
    base = tiny_model(model_type)
    ref = logits(base, ids)
    keys = set(base.state_dict())
    method = method_for(key, model_type)
    model = method.attach(base)
    perturb(model, method)
    adapted = logits(model, ids)
    assert (adapted - ref).abs().max() > 1e-2  # the perturbation matters, so equality below can fail
    merged = method.merge(model)
    assert_plain(merged)
    assert set(merged.state_dict()) == keys  # the plain HF layout
    # DoRA's merge divides by the norm of W + ΔW per row, computed in another order than its forward: fp32 rounding
    # of up to ~2e-5 was seen on some thread counts
    tol = 1e-4 if key == "dora" else 1e-5
    assert (logits(merged, ids) - adapted).abs().max() <= tol
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, ids) - adapted).abs().max() <= tol


@pytest.mark.parametrize("model_type", MODELS)
def test_gain_equals_peft_ia3_with_same_feedforward_modules(model_type):
    """GAIN-FFN and PEFT (IA)3 on [attn_out, ffn_down] as feedforward modules: same maths."""
    ids = tiny_ids()
    targets = [ATTN[model_type], FFN[model_type]]
    gain = method_for("gain_ffn", model_type)
    ia3 = method_for("ia3", model_type, target_modules=targets, feedforward_modules=targets)
    gm = gain.attach(tiny_model(model_type))
    im = ia3.attach(tiny_model(model_type))
    assert ia3.count_trainable(im) == gain.count_trainable(gm) == L * (HIDDEN + INTER)
    perturb(gm, gain, seed=3)
    with torch.no_grad():
        for name, w in gain.wrappers(gm).items():
            vec = get_submodule(im, PEFT + name).ia3_l["default"]
            assert vec.shape == (1, w.gain.numel())  # feedforward: one entry per input channel
            vec.copy_(w.gain[None, :])
    assert (logits(gm, ids) - logits(im, ids)).abs().max() <= 1e-5
    g_merged, i_merged = gain.merge(gm), ia3.merge(im)
    gs, is_ = g_merged.state_dict(), i_merged.state_dict()
    assert set(gs) == set(is_)
    for k in gs:
        assert torch.allclose(gs[k], is_[k], rtol=0, atol=1e-7), k
    changed = [k for k in gs if not torch.equal(gs[k], tiny_model(model_type).state_dict()[k])]
    assert sorted(changed) == sorted(f"{LAYERS[model_type]}.{i}.{p}.weight" for i in range(L) for p in targets)


def test_gain_bf16_model_fp32_gains_and_fp32_merge():
    ids = tiny_ids()
    model = tiny_model("llama", dtype=torch.bfloat16)
    w0 = {n: get_submodule(model, f"model.layers.{i}.{p}").weight.detach().clone()
          for i in range(L) for p in ("self_attn.o_proj", "mlp.down_proj") for n in [f"model.layers.{i}.{p}"]}
    m = method_for("gain_ffn", "llama")
    model = m.attach(model)
    assert all(w.gain.dtype == torch.float32 for w in m.wrappers(model).values())
    assert m.carry_mode(model) == "product"  # auto: 16-bit weights keep an fp32 product across stages
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(w.gain.grad is not None and w.gain.grad.dtype == torch.float32 for w in m.wrappers(model).values())
    model.zero_grad()
    perturb(model, m, seed=1)
    s1 = {n: w.scale().detach().clone() for n, w in m.wrappers(model).items()}
    model = m.finish_stage(model)  # stage 1 done: s1 folded into the fp32 product, weights untouched
    for n, w in m.wrappers(model).items():
        assert torch.equal(w.base.weight, w0[n]) and torch.equal(w.carried, s1[n]) and torch.all(w.gain == 1)
        assert not w.gain.requires_grad
    model = m.attach(model)  # stage 2: fresh s on top of the product
    perturb(model, m, seed=2)
    s2 = {n: w.scale().detach().clone() for n, w in m.wrappers(model).items()}
    merged = m.merge(model)
    for n, w in w0.items():
        weight = get_submodule(merged, n).weight
        assert weight.dtype == torch.bfloat16
        # one rounding: W (bf16) · diag(s1 ⊙ s2) computed in fp32, cast once
        assert torch.equal(weight, (w.float() * (s1[n] * s2[n])[None, :]).to(torch.bfloat16))
        assert not torch.equal(weight, ((w.float() * s1[n][None, :]).to(torch.bfloat16).float()
                                        * s2[n][None, :]).to(torch.bfloat16))  # per-stage rounding differs


def test_gain_carry_product_equals_merge_per_stage_fp32():
    ids = tiny_ids()
    out = {}
    for carry in ("merge", "product"):
        m = method_for("gain_ffn_exp", "gpt2", carry=carry)
        model = tiny_model("gpt2")
        for stage in (1, 2):
            model = m.attach(model)
            perturb(model, m, seed=stage)
            model = m.finish_stage(model)
        assert any(isinstance(x, GainWrapper) for x in model.modules()) == (carry == "product")
        out[carry] = logits(m.merge(model), ids)
    assert (out["merge"] - out["product"]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- Proposition 1

def _residual(W: torch.Tensor, Y: torch.Tensor) -> float:
    """Relative least-squares residual of the columns of Y on the column space of W."""
    coef = torch.linalg.lstsq(W, Y).solution
    return float((W @ coef - Y).norm() / Y.norm())


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_proposition_1_output_space_preservation(model_type):
    """After merging, W' = W·diag(s) maps every input into col(W); a LoRA update W + BA does not.
    W is made rank-deficient (rank 4 < out dim 32), so a leak out of col(W) would be visible."""
    conv1d = model_type == "gpt2"
    path = f"{LAYERS[model_type]}.0.{FFN[model_type]}"  # FFN down projection: in 48 -> out 32
    g = torch.Generator().manual_seed(0)
    # (out, in) = (32, 48), rank 4, exactly representable in fp32 (small integers / 16)
    low_rank = (torch.randint(-3, 4, (32, 4), generator=g) @ torch.randint(-3, 4, (4, 48), generator=g)).float() / 16

    def model_with_low_rank_layer():
        model = tiny_model(model_type)
        with torch.no_grad():
            get_submodule(model, path).weight.copy_(low_rank.T if conv1d else low_rank)
        return model

    def effective(model) -> torch.Tensor:  # the layer as an (out, in) matrix, in float64
        w = get_submodule(model, path).weight.detach().double()
        return w.T if conv1d else w

    W = low_rank.double()
    assert torch.linalg.matrix_rank(W) == 4
    X = torch.randn(48, 200, generator=g, dtype=torch.float64)

    gain = method_for("gain_ffn", model_type)
    gm = gain.attach(model_with_low_rank_layer())
    perturb(gm, gain, seed=5, scale=0.5)
    W_gain = effective(gain.merge(gm))
    assert (W_gain - W).abs().max() > 1e-2  # the layer did change
    assert _residual(W, W_gain @ X) < 1e-6

    lora = method_for("lora", model_type, target_modules=[FFN[model_type]])
    lm = lora.attach(model_with_low_rank_layer())
    perturb(lm, lora, seed=5, scale=0.5)
    W_lora = effective(lora.merge(lm))
    assert (W_lora - W).abs().max() > 1e-2
    assert _residual(W, W_lora @ X) > 0.1


# ---------------------------------------------------------------------------------------------- state round trip

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("key", list(METHODS))
def test_state_round_trip_through_safetensors(key, model_type, tmp_path):
    ids = tiny_ids()
    method = method_for(key, model_type)
    model = method.attach(tiny_model(model_type))
    perturb(model, method, seed=7)
    want = logits(model, ids)
    state = method.state_dict(model)
    assert all(t.device.type == "cpu" for t in state.values())
    path = atomic_save_safetensors(tmp_path / "method_state.safetensors", state)
    loaded = load_file(str(path))
    assert set(loaded) == set(state)

    fresh = build_method({**METHODS[key]}, arch_for(model_type))
    other = fresh.attach(tiny_model(model_type))
    assert (logits(other, ids) - want).abs().max() > 1e-3
    fresh.load_state_dict(other, loaded)
    assert torch.equal(logits(other, ids), want)
    # carrying forward gives the same function
    finished = fresh.finish_stage(other)
    assert (logits(finished, ids) - want).abs().max() <= 1e-5

    broken = dict(loaded)
    broken.pop(sorted(broken)[0])
    with pytest.raises(GainError, match="does not fit"):
        method_for(key, model_type).load_state_dict(method_for(key, model_type).attach(tiny_model(model_type)), broken)


def test_state_of_wrong_shape_is_refused():
    m = method_for("gain_ffn", "llama")
    state = m.state_dict(m.attach(tiny_model("llama")))
    state = {k: torch.ones(v.numel() + 1) for k, v in state.items()}
    with pytest.raises(GainError, match="shape"):
        m2 = method_for("gain_ffn", "llama")
        m2.load_state_dict(m2.attach(tiny_model("llama")), state)


# ---------------------------------------------------------------------------------------------- IMSM

def test_imsm_is_not_mergeable():
    m = method_for("imsm", "llama")
    assert m.mergeable is False and METHOD_KINDS["imsm"].mergeable is False
    model = m.attach(tiny_model("llama"))
    with pytest.raises(GainError, match="cannot be merged into a single plain model"):
        m.merge(model)


def test_imsm_gate_formula_by_hand():
    """logits = head(g ⊙ h_f + (1 − g) ⊙ h_t), g = sigmoid(B A [q_f; h_f; h_t; q_t]), q = causal means."""
    ids = tiny_ids(batch=2, seq=7)
    m = method_for("imsm", "qwen2")
    model = m.attach(tiny_model("qwen2"))
    perturb(model, m, seed=11)
    assert isinstance(model, SiameseLM)
    with torch.no_grad():
        h_f = model.frozen.model(input_ids=ids).last_hidden_state
        h_t = model.tuned.get_base_model().model(input_ids=ids).last_hidden_state
        assert (h_f - h_t).abs().max() > 1e-2
        q_f = torch.stack([h_f[:, : t + 1].mean(1) for t in range(ids.shape[1])], 1)
        q_t = torch.stack([h_t[:, : t + 1].mean(1) for t in range(ids.shape[1])], 1)
        A, B = model.gate.A.weight, model.gate.B.weight
        g = torch.sigmoid(torch.cat([q_f, h_f, h_t, q_t], -1) @ A.T @ B.T)
        want = model.frozen.lm_head(g * h_f + (1 - g) * h_t)
        out = model(input_ids=ids, labels=ids)
        assert (out.logits - want).abs().max() <= 1e-5
        ce = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), ids[:, 1:].reshape(-1))
        assert float(out.loss) == pytest.approx(float(ce), abs=1e-5)
        # padding: masked positions do not enter the running means
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        cm = causal_mean(h_f, mask)
        assert torch.allclose(cm[0, 4], h_f[0, 2:5].mean(0), atol=1e-6)
    assert model.config is model.frozen.config and model.dtype == torch.float32
    assert model.device.type == "cpu"
    model.tie_weights()
    assert model.eval() is model and not model.training


def test_imsm_two_stages_carry_adapter_merge_and_gate(tmp_path):
    ids = tiny_ids()
    base_state = {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}
    m = method_for("imsm", "llama")
    model = m.attach(tiny_model("llama"))
    train_steps(model, m, ids, steps=3)
    states = [m.state_dict(model)]
    before_finish = logits(model, ids)
    gate1 = {k: v.clone() for k, v in model.gate.state_dict().items()}
    model = m.finish_stage(model)
    assert isinstance(model, SiameseLM) and not model.is_peft_attached
    assert_plain(model.tuned)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, gate1[k]) for k, v in model.gate.state_dict().items())  # gate carried
    assert (logits(model, ids) - before_finish).abs().max() <= 1e-5  # LoRA merged into the tuned branch
    tuned_weights = {k: v.clone() for k, v in model.tuned.state_dict().items()}
    assert any(not torch.equal(tuned_weights[k], base_state[k]) for k in base_state)

    model = m.attach(model)  # stage 2: a fresh adapter on the tuned branch, same gate
    names, count = expected_trainable("imsm", "llama", model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    assert m.count_trainable(model) == count
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, m, ids, steps=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n
    for k, v in model.frozen.state_dict().items():  # the frozen branch is the pretrained model
        assert torch.equal(v, base_state[k])
    states.append(m.state_dict(model))
    model = m.finish_stage(model)
    want = logits(model, ids)

    # rebuild from the saved per-stage states (what `gain eval --run` does)
    replay = build_method(METHODS["imsm"], arch_for("llama"))
    rebuilt = tiny_model("llama")
    for k, st in enumerate(states, 1):
        path = atomic_save_safetensors(tmp_path / f"s{k}.safetensors", st)
        rebuilt = replay.attach(rebuilt)
        replay.load_state_dict(rebuilt, load_file(str(path)))
        rebuilt = replay.finish_stage(rebuilt)
    assert (logits(rebuilt, ids) - want).abs().max() <= 1e-5
    with pytest.raises(GainError, match="cannot be merged"):
        replay.merge(rebuilt)


def test_imsm_refuses_a_double_attach_and_a_state_before_attach():
    m = method_for("imsm", "gpt2")
    model = m.attach(tiny_model("gpt2"))
    with pytest.raises(GainError, match="already attached"):
        m.attach(model)
    state = m.state_dict(model)
    model = m.finish_stage(model)
    with pytest.raises(GainError, match="attach first"):
        m.load_state_dict(model, state)


def test_imsm_copy_is_independent_of_later_changes():
    """The frozen branch is a deep copy: changing the tuned branch's base weights leaves it alone."""
    m = method_for("imsm", "llama")
    model = m.attach(tiny_model("llama"))
    frozen = copy.deepcopy(model.frozen.state_dict())
    with torch.no_grad():
        model.tuned.get_base_model().model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert all(torch.equal(v, frozen[k]) for k, v in model.frozen.state_dict().items())


@pytest.mark.parametrize("model_type, targets, ff_module, other_module", [
    ("llama", ["self_attn.o_proj", "mlp.down_proj"], "mlp.down_proj", "self_attn.o_proj"),
    ("gpt2", ["attn.c_proj", "mlp.c_proj"], "mlp.c_proj", "attn.c_proj"),
])
def test_ia3_feedforward_targets_are_matched_by_module_not_spelling(model_type, targets, ff_module, other_module):
    """`mlp.down_proj` is PEFT's feedforward `down_proj` (GPT-2: `mlp.c_proj`): its vector scales the input, the
    attention output projection's the output."""
    from peft.tuners.ia3 import IA3Layer

    from gain_cli.methods import build_method
    from gain_cli.models.loading import model_spec

    model = tiny_model(model_type)
    method = build_method({"name": "ia3", "kind": "ia3", "target_modules": targets, "feedforward_modules": None},
                          model_spec({}, model.config.model_type))
    peft_model = method.attach(model)
    seen = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, IA3Layer):
            side = "in" if mod.is_feedforward else "out"
            seen.setdefault(name.split(".h.0.")[-1].split(".layers.0.")[-1], (side, mod.ia3_l["default"].numel(),
                                                                               mod.in_features, mod.out_features))
    side, n, fan_in, _ = seen[ff_module]
    assert side == "in" and n == fan_in
    side, n, _, fan_out = seen[other_module]
    assert side == "out" and n == fan_out


def test_ia3_target_naming_feedforward_and_other_modules_at_once_is_refused():
    from gain_cli.errors import GainError
    from gain_cli.methods.ia3 import feedforward_among

    assert feedforward_among(["c_attn", "mlp.c_proj"], ["mlp.c_proj"]) == ["mlp.c_proj"]
    assert feedforward_among(["k_proj", "model.layers.0.mlp.down_proj"], ["down_proj"]) == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(GainError, match="'c_proj' names feedforward modules \\(mlp.c_proj\\) and others at once"):
        feedforward_among(["c_attn", "c_proj"], ["mlp.c_proj"])
