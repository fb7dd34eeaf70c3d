"""Replay-augmented LoRA, EWC and L2 baselines: mixing, penalties, state round trips, end to end."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gain_cli.architectures import ARCHITECTURES
from gain_cli.errors import GainError
from gain_cli.io import atomic_save_safetensors
from gain_cli.methods import ewc as _ewc, l2 as _l2, replay as _replay  # noqa: F401  (registration)
from gain_cli.methods import build_method
from gain_cli.methods.base import StageContext
from gain_cli.methods.lora import Lora
from gain_cli.methods.replay import replay_slots
from gain_cli.training.loop import stage_order

SPEC = ARCHITECTURES["llama"]
SEQ = 8
DOMAINS = ["d0", "d1", "d2", "d3"]  # domain i uses tokens [16 i, 16 i + 16) only
N_BLOCKS = {"d0": 100, "d1": 60, "d2": 40, "d3": 30}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "lr": 1e-3}


# --- fixtures: a tiny model and DomainData-like data --------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on shared cores: one thread avoids oversubscription (4x faster under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeData:
    """Blocks whose content tells their domain (token range) and their index (tokens 0..2, base 16)."""

    def blocks(self, name, split, block, max_blocks=None):
        i = DOMAINS.index(name)
        n = N_BLOCKS[name]
        g = torch.Generator().manual_seed(10 * i + (split == "validation"))
        out = torch.randint(0, 16, (n, block), generator=g)
        b = torch.arange(n)
        out[:, 0], out[:, 1], out[:, 2] = b // 256, (b // 16) % 16, b % 16
        return (out + 16 * i)[:max_blocks]


def domain_of(block):
    return int(block[0]) // 16


def block_id(block):
    d = 16 * domain_of(block)
    return domain_of(block), int(block[0] - d) * 256 + int(block[1] - d) * 16 + int(block[2] - d)


class FakeAccelerator:
    def __init__(self, n=1):
        self.num_processes = n


def ctx(stage, steps=4, bs=4, ga=1, seed=0, world=1):
    return StageContext(stage=stage, domain=DOMAINS[stage - 1], earlier=DOMAINS[: stage - 1], data=FakeData(),
                        train_cfg={"seq_len": SEQ, "steps": steps, "batch_size": bs, "grad_accum": ga},
                        seed=seed, accelerator=FakeAccelerator(world))


def tiny_model(seed=0, model_type="llama"):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if model_type == "gpt2":  # Conv1D projections: weights stored (in, out), LoRA with fan_in_fan_out
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=1, eos_token_id=2)).eval()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def method(kind, spec=SPEC, **cfg):
    return build_method({"name": kind, "kind": kind, **cfg}, spec)


def loop_sequence(blocks, c, m):
    """The sequences the training loop feeds, in order (the method's order, else the loop's seeded shuffle)."""
    t = c.train_cfg
    n = t["steps"] * t["batch_size"] * t["grad_accum"] * c.accelerator.num_processes
    order = m.training_order(blocks.shape[0], n, c.seed, c.stage)
    return blocks[stage_order(blocks.shape[0], n, c.seed, c.stage) if order is None else order]


def val(t):
    return float(t.detach())


def perturb(tensors, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g) * scale for t in tensors]


# --- replay ------------------------------------------------------------------------------------

def test_replay_stage1_is_plain_lora():
    m = method("lora_replay", **LORA, replay_fraction=0.1, buffer_blocks=8)
    assert torch.equal(m.stage_blocks(ctx(1)), Lora({"name": "lora", **LORA}, SPEC).stage_blocks(ctx(1)))
    assert m.stage_info()["replay"]["replayed_blocks"] == 0 and m.stage_info()["replay"]["stored_blocks"] == 0


def test_replay_mixes_earlier_domains_in_the_stated_proportion():
    m = method("lora_replay", **LORA, replay_fraction=0.1, buffer_blocks=8)
    c = ctx(3, steps=20, bs=8, ga=2)  # 320 sequences, earlier domains d0, d1
    blocks = m.stage_blocks(c)
    assert blocks.shape == (320, SEQ)
    seq = loop_sequence(blocks, c, m)
    doms = [domain_of(b) for b in seq]
    assert set(doms) == {0, 1, 2}  # never the future domain d3
    replay = [d != 2 for d in doms]
    assert sum(replay) == 32
    for i in range(0, 320 - 10 + 1):  # every window of 10 consecutive sequences: exactly one replayed
        assert sum(replay[i:i + 10]) == 1, i
    assert doms.count(0) == doms.count(1) == 16  # earlier domains share the replay slots equally
    for d in (0, 1):  # drawn from a bounded buffer: 8 distinct blocks per domain, each used twice
        ids = [block_id(b)[1] for b in seq if domain_of(b) == d]
        assert len(set(ids)) == 8 and all(ids.count(i) == 2 for i in set(ids))
    own = [block_id(b)[1] for b in seq if domain_of(b) == 2]
    assert len(own) == 288 and set(own) == set(range(N_BLOCKS["d2"]))  # own blocks cycled in full passes
    info = m.stage_info()["replay"]
    assert info["stored_blocks"] == 16 and info["stored_tokens"] == 16 * SEQ
    assert info["buffered_blocks"] == {"d0": 8, "d1": 8}
    assert info["replayed_blocks"] == 32 and info["replayed_tokens"] == 32 * SEQ
    assert info["replayed_by_domain"] == {"d0": 16, "d1": 16} and info["stage_sequences"] == 320


def test_replay_every_batch_of_every_process():
    m = method("lora_replay", **LORA, replay_fraction=0.25, buffer_blocks=4)
    c = ctx(2, steps=5, bs=8, ga=2, world=2)
    seq = loop_sequence(m.stage_blocks(c), c, m)
    assert seq.shape[0] == 5 * 8 * 2 * 2
    for start in range(0, seq.shape[0], 8):  # each process's micro-batch is a consecutive slice of bs
        assert sum(domain_of(b) == 0 for b in seq[start:start + 8]) == 2


def test_replay_buffer_is_deterministic_and_per_domain():
    m = method("lora_replay", **LORA, replay_fraction=0.2, buffer_blocks=8)
    assert torch.equal(m.stage_blocks(ctx(3)), m.stage_blocks(ctx(3)))
    buf3 = m.buffer(ctx(3), "d0", 1)
    assert torch.equal(buf3, m.buffer(ctx(4), "d0", 1))  # the same buffer at every later stage
    assert not torch.equal(buf3, m.buffer(ctx(3, seed=1), "d0", 1))
    assert buf3.shape[0] == 8 and len({block_id(b) for b in buf3}) == 8
    assert replay_slots(10, 0.3).tolist() == [False, False, False, True, False, False, True, False, False, True]


@pytest.mark.parametrize("bad", [{"replay_fraction": 1.0}, {"replay_fraction": -0.1}, {"buffer_blocks": 0}])
def test_replay_config_errors(bad):
    with pytest.raises(GainError):
        method("lora_replay", **LORA, **bad)


# --- EWC ----------------------------------------------------------------------------------------

def _trainables(m, model):
    return [p for _, p in m.trainable_parameters(model)]


def _ewc_stage2(base, model_type="llama", **cfg):
    """EWC after stage 1 (Fisher of d0) and attached for stage 2; returns (method, model, model before attach)."""
    m = method("ewc", ARCHITECTURES[model_type], base=base, **({"lr": 1e-3} if base == "full_ft" else LORA),
               fisher_batches=2, **cfg)
    model = m.attach(tiny_model(model_type=model_type))
    assert m.regularization(model) is None  # stage 1: no Fisher yet
    if base == "lora":  # as if trained: make the stage-1 adapter non-zero
        with torch.no_grad():
            for p, d in zip(_trainables(m, model), perturb(_trainables(m, model), 0.05)):
                p.add_(d)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    m.after_training(model, ctx(1))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # Fisher leaves no trace
    prev = m.finish_stage(model)
    snapshot = copy.deepcopy(prev)  # attach changes the model in place (PEFT injects its layers)
    return m, m.attach(prev), snapshot


def test_ewc_full_ft_penalty_zero_at_anchor_and_quadratic():
    m, model, _ = _ewc_stage2("full_ft", **{"lambda": 3.0})
    params = dict(m.trainable_parameters(model))
    assert set(m.fisher) == set(params) and all((f >= 0).all() for f in m.fisher.values())
    assert sum(f.sum() for f in m.fisher.values()) > 0
    pen0 = m.regularization(model)
    assert pen0 is not None and val(pen0) == 0.0
    deltas = perturb(params.values(), 1e-2)
    with torch.no_grad():
        for p, d in zip(params.values(), deltas):
            p.add_(d)
    pen1 = val(m.regularization(model))
    expected = 0.5 * 3.0 * sum(float((m.fisher[n] * d ** 2).sum()) for n, d in zip(params, deltas))
    assert pen1 > 0 and pen1 == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        for p, d in zip(params.values(), deltas):
            p.add_(d)  # twice the displacement
    assert val(m.regularization(model)) == pytest.approx(4 * pen1, rel=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ewc_lora_penalty_is_on_the_merged_weight_change(model_type):
    m, model, prev = _ewc_stage2("lora", model_type, **{"lambda": 5.0})
    if model_type == "llama":
        assert set(m.fisher) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"}
    else:  # Conv1D: the Fisher has the stored (in, out) layout of the weight
        assert m.fisher["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert val(m.regularization(model)) == 0.0  # fresh adapter: B = 0, the merged model is the anchor
    lora_b = [p for n, p in m.trainable_parameters(model) if "lora_B" in n]
    with torch.no_grad():
        for p, d in zip(lora_b, perturb(lora_b, 0.05)):
            p.copy_(d)
    pen1 = val(m.regularization(model))
    merged = m.merge(copy.deepcopy(model))
    before, after = dict(prev.named_parameters()), dict(merged.named_parameters())
    expected = 0.5 * 5.0 * sum(val((f * (after[n] - before[n]) ** 2).sum()) for n, f in m.fisher.items())
    assert pen1 > 0 and pen1 == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():
        for p in lora_b:
            p.mul_(2.0)
    assert val(m.regularization(model)) == pytest.approx(4 * pen1, rel=1e-4)


def test_ewc_fisher_accumulates():
    for mode in ("sum", "mean"):
        m, model, _ = _ewc_stage2("full_ft", **{"lambda": 1.0, "fisher_accumulate": mode})
        f1 = {k: v.clone() for k, v in m.fisher.items()}
        f2 = m.estimate_fisher(model, ctx(2))
        m.after_training(model, ctx(2))
        assert m.n_domains == 2 and m.stage_info()["ewc"]["fisher_domains"] == 2
        for k in f1:
            want = f1[k] + f2[k] if mode == "sum" else (f1[k] + f2[k]) / 2
            assert torch.allclose(m.fisher[k], want)


@pytest.mark.parametrize("base", ["full_ft", "lora"])
def test_ewc_state_round_trip(base, tmp_path):
    m, model, prev = _ewc_stage2(base, **{"lambda": 2.0})
    tr = _trainables(m, model)
    with torch.no_grad():
        for p, d in zip(tr, perturb(tr, 1e-2)):
            p.add_(d)
    pen = m.regularization(model)
    path = atomic_save_safetensors(tmp_path / "state.safetensors", m.state_dict(model))  # as the runner saves it
    state = load_file(str(path))
    assert any(k.startswith("ewc_fisher/") for k in state) and int(state["ewc_meta/domains"][0]) == 1
    assert any(k.startswith("ewc_anchor/") for k in state) == (base == "full_ft")

    m2 = method("ewc", base=base, **({"lr": 1e-3} if base == "full_ft" else LORA), fisher_batches=2, **{"lambda": 2.0})
    fresh = m2.attach(tiny_model(seed=5) if base == "full_ft" else copy.deepcopy(prev))  # stage 2 starts from prev
    m2.load_state_dict(fresh, state)
    assert val(m2.regularization(fresh)) == pytest.approx(val(pen), rel=1e-6)
    assert all(torch.equal(m.fisher[k], m2.fisher[k]) for k in m.fisher)
    with pytest.raises(GainError):  # a Fisher that does not fit the model is refused
        m3 = method("ewc", base=base, **({"lr": 1e-3} if base == "full_ft" else LORA), **{"lambda": 2.0})
        other = m3.attach(tiny_model() if base == "full_ft" else copy.deepcopy(prev))
        m3.load_state_dict(other, {**state, "ewc_fisher/not.a.weight": torch.zeros(1)})


def test_ewc_config_errors():
    with pytest.raises(GainError, match="method.base"):
        method("ewc", base="gain")
    with pytest.raises(GainError, match="fisher_accumulate"):
        method("ewc", base="full_ft", fisher_accumulate="max")
    with pytest.raises(GainError, match="lambda"):
        method("ewc", base="full_ft", **{"lambda": -1})
    for kind in ("ewc", "l2"):  # sharded training (train.sharding=fsdp) is refused with a penalty
        with pytest.raises(GainError, match="cannot train sharded"):
            method(kind, base="lora", **{"lambda": 1.0}).check_shardable()
    method("l2", base="lora", **{"lambda": 0.0}).check_shardable()  # plain LoRA: shardable
    assert method("ewc", base="lora", **{"lambda": 1.0}).stage_blocks(ctx(1)).shape == (N_BLOCKS["d0"], SEQ)


# --- L2 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["full_ft", "lora"])
def test_l2_penalty_and_round_trip(base, tmp_path):
    cfg = {"base": base, "lambda": 0.7, **({"lr": 1e-3} if base == "full_ft" else LORA)}
    m = method("l2", **cfg)
    start = tiny_model()
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    model = m.attach(start)
    assert val(m.regularization(model)) == 0.0  # at the previous stage's weights
    tr = _trainables(m, model)
    with torch.no_grad():
        for p, d in zip(tr, perturb(tr, 2e-2)):
            p.add_(d)
    pen = val(m.regularization(model))
    after = dict(m.merge(copy.deepcopy(model)).named_parameters())
    assert pen > 0 and pen == pytest.approx(0.7 * sum(val(((after[n] - before[n]) ** 2).sum()) for n in before),
                                            rel=1e-3)
    state = load_file(str(atomic_save_safetensors(tmp_path / "s.safetensors", m.state_dict(model))))
    assert any(k.startswith("l2_anchor/") for k in state) == (base == "full_ft")
    m2 = method("l2", **cfg)
    fresh = m2.attach(tiny_model(seed=3))
    m2.load_state_dict(fresh, state)
    assert val(m2.regularization(fresh)) == pytest.approx(pen, rel=1e-6)
    assert method("l2", **{**cfg, "lambda": 0.0}).regularization(fresh) is None


# --- what trains -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cfg,lora_only", [
    ("lora_replay", {**LORA}, True),
    ("ewc", {"base": "lora", **LORA, "lambda": 1.0}, True),
    ("l2", {"base": "lora", **LORA, "lambda": 1.0}, True),
    ("ewc", {"base": "full_ft", "lambda": 1.0, "lr": 1e-3}, False),
    ("l2", {"base": "full_ft", "lambda": 1.0, "lr": 1e-3}, False),
])
def test_only_the_promised_parameters_train(kind, cfg, lora_only):
    plain = tiny_model()
    plain_keys = set(plain.state_dict())
    n_all = sum(p.numel() for p in plain.parameters())
    m = method(kind, **cfg)
    model = m.attach(tiny_model())
    if kind == "ewc":  # a second stage, so that there is a Fisher (and for full FT an anchor)
        m.after_training(model, ctx(1))
        model = m.attach(m.finish_stage(model))
    names = [n for n, _ in m.trainable_parameters(model)]
    if lora_only:
        assert names and all("lora_A" in n or "lora_B" in n for n in names)
        assert m.count_trainable(model) == Lora({"name": "lora", **LORA}, SPEC).count_trainable(
            Lora({"name": "lora", **LORA}, SPEC).attach(tiny_model()))
    else:
        assert m.count_trainable(model) == n_all
    groups = m.optimizer_groups(model)
    assert sum(p.numel() for g in groups for p in g["params"]) == m.count_trainable(model)
    if kind != "lora_replay":  # the penalty's gradient reaches only trainable parameters
        tr = _trainables(m, model)
        with torch.no_grad():
            for p, d in zip(tr, perturb(tr, 1e-2)):
                p.add_(d)
        m.regularization(model).backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr)
    merged = m.merge(model)
    assert set(merged.state_dict()) == plain_keys  # nothing of the method is left in the model


# --- end to end through the CLI -----------------------------------------------------------------

cli = CliRunner()
FAST = ["recipe=tiny_8domains", "domains.sequence=[dna,code]", "model.pretrain=null", "train.steps=6", "train.checkpoint_every=3",
        "train.threads=1", "eval.max_blocks=4", "eval.harness.enabled=false"]
E2E = {"lora_replay": ["method.buffer_blocks=16", "method.replay_fraction=0.25"], "ewc": ["method.lambda=1e4"],
       "ewc_lora": [], "l2": ["method.lambda=0.5"]}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    return {}, tmp_path_factory.mktemp("baseline_runs")


def _run(e2e_runs, name):
    done, root = e2e_runs
    if name not in done:
        rd = root / name
        res = cli.invoke(app(), ["run", *FAST, f"method={name}", *E2E[name], f"run_dir={rd}"])
        assert res.exit_code == 0, res.output
        done[name] = rd
    return done[name]


def app():
    from gain_cli.cli import app as gain_app

    return gain_app


def _values(rd):
    return json.loads((rd / "ppl_matrix.json").read_text())["values"]


@pytest.mark.parametrize("name", list(E2E))
def test_cli_run_of_each_baseline(name, e2e_runs):
    rd = _run(e2e_runs, name)
    vals = _values(rd)
    assert len(vals) == 3 and all(v > 1 for row in vals for v in row)
    assert vals[1][0] < vals[0][0]  # stage 1 adapted to its own domain
    info = [json.loads((rd / "stages" / f"stage_{k}" / "metrics.json").read_text())["method_info"] for k in (1, 2)]
    state2 = load_file(str(rd / "stages" / "stage_2" / "method_state.safetensors"))
    if name == "lora_replay":
        assert info[0]["replay"]["replayed_blocks"] == 0
        assert info[1]["replay"]["replayed_blocks"] == 6 * 8 // 4 and info[1]["replay"]["buffered_blocks"] == {"dna": 16}
        assert info[1]["replay"]["stored_tokens"] == 16 * 64
    elif name.startswith("ewc"):
        assert info[1]["ewc"]["fisher_domains"] == 2 and info[1]["ewc"]["final_penalty"] > 0
        assert int(state2["ewc_meta/domains"][0]) == 2
        assert any(k.startswith("ewc_anchor/") for k in state2) == (name == "ewc")
    else:
        assert info[1]["l2"]["final_penalty"] > 0 and info[1]["l2"]["base"] == "lora"


def test_ewc_resume_mid_stage_gives_the_same_matrix(e2e_runs, tmp_path, monkeypatch):
    """Killed in stage 2 after its step-3 checkpoint: Fisher and anchor come back from disk exactly."""
    ref = _run(e2e_runs, "ewc")
    import gain_cli.faults as faults

    real = faults.point

    def crash(name):
        real(name)
        if name == "stage2.step5":
            raise KeyboardInterrupt

    monkeypatch.setattr(faults, "point", crash)
    rd = tmp_path / "ewc"
    res = cli.invoke(app(), ["run", *FAST, "method=ewc", *E2E["ewc"], f"run_dir={rd}"])
    assert res.exit_code == 130, res.output
    assert (rd / "stages" / "stage_2" / "checkpoint.json").is_file()
    monkeypatch.setattr(faults, "point", real)
    res = cli.invoke(app(), ["run", *FAST, "method=ewc", *E2E["ewc"], f"run_dir={rd}", "resume=true"])
    assert res.exit_code == 0, res.output
    assert _values(rd) == _values(ref)
