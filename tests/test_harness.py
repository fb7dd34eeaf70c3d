"""lm-evaluation-harness BoolQ on the model in memory, offline, on a tiny Llama with locally built tokenizers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gain_cli.errors import GainError
from gain_cli.evaluation.harness import (
    BUILTIN_BOOLQ,
    TASK_TEMPLATES,
    boolq_prompt,
    boolq_source,
    harness_results,
    interleave_labels,
    load_boolq_jsonl,
    resolve_harness_cfg,
    run_harness,
    score_yes_no,
)

EOS, PAD = "<|endoftext|>", "<|pad|>"

ITEMS = [
    {"passage": "The river floods every spring when the snow on the hills melts.",
     "question": "does the river flood in spring", "label": True},
    {"passage": "Owls hunt at night and sleep during the day in hollow trees.",
     "question": "do owls hunt mainly during the day", "label": False},
    {"passage": "The bakery opens at six and sells fresh bread until noon.",
     "question": "is fresh bread sold in the morning", "label": True},
    {"passage": "Iron rusts when it is exposed to water and oxygen for a long time.",
     "question": "does iron stay shiny forever in wet air", "label": False},
    {"passage": "The museum is closed on Mondays but open every other day of the week.",
     "question": "can you visit the museum on a monday", "label": False},
    {"passage": "Maple trees lose their leaves in autumn and grow new ones in spring.",
     "question": "do maple trees lose their leaves in autumn", "label": True},
    {"passage": "The train to the coast leaves every hour from platform two.",
     "question": "does the coast train leave from platform two", "label": True},
    {"passage": "Cats cannot taste sweet things because they lack the receptor for sugar.",
     "question": "can cats taste sugar", "label": False},
]


def _write_items(path: Path, items=ITEMS) -> Path:
    path.write_text("".join(json.dumps({**it, "idx": i}) + "\n" for i, it in enumerate(items)))
    return path


def _tokenizer(merges: bool):
    """Byte-level BPE trained in-process (merges=True: ' yes'/' no' single tokens) or bytes only (multi-token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{boolq_prompt(it)} {'yes' if it['label'] else 'no'}" for it in ITEMS] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400 if merges else len(alphabet) + 2, special_tokens=[EOS, PAD],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def _model(tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.5,  # wide init: choices depend on the input, unlike a near-uniform model
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _manual_scores(model, tok, items):
    """Sum of continuation log-probs of ' no' / ' yes' after the BoolQ prompt, one sequence at a time."""
    out = []
    for it in items:
        prompt = boolq_prompt(it)
        ctx = tok.encode(prompt)
        row = []
        for choice in ("no", "yes"):
            cont = tok.encode(prompt + " " + choice)[len(ctx):]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            row.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        out.append(row)
    return out


def _pick_model(tok):
    """First seed whose predictions are mixed, clear of ties and not at the constant predictor's accuracy (0.5),
    so that a harness result that ignored the items (or swapped yes/no) would fail the checks."""
    labels = [int(it["label"]) for it in ITEMS]
    for seed in range(50):
        model = _model(tok, seed)
        scores = _manual_scores(model, tok, ITEMS)
        preds = [int(s[1] > s[0]) for s in scores]
        acc = float(np.mean([p == y for p, y in zip(preds, labels)]))
        if 0 < sum(preds) < len(preds) and acc != 0.5 and min(abs(s[1] - s[0]) for s in scores) > 1e-3:
            return model, preds, acc
    raise AssertionError("no seed gives mixed, tie-free predictions")


@pytest.fixture(scope="module", params=["bpe", "bytes"])
def setup(request, tmp_path_factory):
    tok = _tokenizer(merges=request.param == "bpe")
    model, preds, acc = _pick_model(tok)
    data = _write_items(tmp_path_factory.mktemp("boolq") / "items.jsonl")
    work = tmp_path_factory.mktemp("harness")
    raw = harness_results(model, tok, {"boolq_path": str(data), "boolq_balanced": False, "batch_size": 3}, work, log_samples=True)
    return SimpleNamespace(kind=request.param, tok=tok, model=model, preds=preds, acc=acc, data=data, work=work,
                           raw=raw)


def _lmeval_choices(raw):
    samples = sorted(raw["samples"]["boolq"], key=lambda s: s["doc_id"])
    return [int(np.argmax([r[0] for r in s["filtered_resps"]])) for s in samples]


def test_tokenizer_paths(setup):
    cont = {c: setup.tok.encode(boolq_prompt(ITEMS[0]) + " " + c)[len(setup.tok.encode(boolq_prompt(ITEMS[0]))):]
            for c in ("yes", "no")}
    single = all(len(v) == 1 for v in cont.values())
    assert single == (setup.kind == "bpe")  # bpe exercises score_yes_no's one-pass path, bytes the general one


def test_lmeval_prompt_is_stock_boolq(setup):
    samples = sorted(setup.raw["samples"]["boolq"], key=lambda s: s["doc_id"])
    for s, it in zip(samples, ITEMS):
        assert [tuple(a) for a in s["arguments"]] == [(boolq_prompt(it), " no"), (boolq_prompt(it), " yes")]
        assert s["target"] == int(it["label"])


def test_boolq_accuracy_equals_manual_loglikelihood(setup):
    res = run_harness(setup.model, setup.tok, {"boolq_path": str(setup.data), "boolq_balanced": False, "batch_size": 3}, setup.work)
    assert set(res) == {"boolq"}
    assert res["boolq"]["n"] == len(ITEMS)
    assert res["boolq"]["acc"] == pytest.approx(setup.acc)
    assert res["boolq"]["acc"] != 0.5 and 0 < sum(setup.preds) < len(ITEMS)
    assert res["boolq"]["acc_stderr"] > 0
    assert _lmeval_choices(setup.raw) == setup.preds


def test_per_item_is_each_docs_correctness_in_doc_order(setup):
    """run_harness's per_item: one 0.0/1.0 per item in file order (the manual choice equals the label), mean = acc."""
    res = run_harness(setup.model, setup.tok, {"boolq_path": str(setup.data), "boolq_balanced": False, "batch_size": 3}, setup.work)["boolq"]
    expect = [float(p == int(it["label"])) for p, it in zip(setup.preds, ITEMS)]
    assert res["per_item"] == expect
    assert len(res["per_item"]) == res["n"] == len(ITEMS)
    assert sum(res["per_item"]) / res["n"] == pytest.approx(res["acc"])
    cfg = {"boolq_path": str(setup.data), "limit": 3}
    limited = run_harness(setup.model, setup.tok, {**cfg, "boolq_balanced": False}, setup.work)["boolq"]
    assert limited["per_item"] == expect[:3] and limited["n"] == 3
    # balanced (the default): doc order is yes/no/yes/no (each side in file order): items 0, 1, 2, 3 ...
    order = [it["i"] for it in interleave_labels([{**it, "i": i} for i, it in enumerate(ITEMS)])]
    balanced = run_harness(setup.model, setup.tok, {**cfg, "limit": 4}, setup.work)["boolq"]
    assert [bool(ITEMS[i]["label"]) for i in order[:4]] == [True, False, True, False]
    assert balanced["per_item"] == [expect[i] for i in order[:4]]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_score_yes_no_agrees_with_lmeval_per_item(setup, batch_size):
    items = load_boolq_jsonl(setup.data)
    assert score_yes_no(setup.model, setup.tok, items, batch_size=batch_size) == _lmeval_choices(setup.raw)


@pytest.mark.parametrize(
    "line3, expect",
    [
        ('{"question": "q", "label": true}', "missing field 'passage'"),
        ('{"passage": "p", "label": true}', "missing field 'question'"),
        ('{"question": "q", "passage": "p"}', "missing field 'label'"),
        ('{"question": "q", "passage": "p", "label": "maybe"}', "field 'label'"),
        ('{"question": "q", "passage": "p", "label": true', "not valid JSON"),
        ('["q", "p", true]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, line3, expect):
    good = json.dumps({"question": "q", "passage": "p", "label": False})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line3}\n{good}\n")  # blank line 2 is skipped but still counted
    with pytest.raises(GainError, match=rf"bad\.jsonl:3: .*{expect}"):
        load_boolq_jsonl(path)


def test_malformed_jsonl_fails_run_harness(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "passage": "p", "label": 1}\n{"question": "q", "label": 0}\n')
    with pytest.raises(GainError, match=r"bad\.jsonl:2: missing field 'passage'"):
        run_harness(torch.nn.Linear(1, 1), _tokenizer(True), {"boolq_path": str(path)}, tmp_path / "w")


def test_limit_and_offline_default(tmp_path):
    """limit caps n; offline with no boolq_path the packaged 24-item file is used, still reported as `boolq`."""
    tok = _tokenizer(True)
    model = _model(tok, 0)
    res = run_harness(model, tok, {"limit": 5}, tmp_path)  # conftest sets HF_HUB_OFFLINE=1
    assert set(res) == {"boolq"} and res["boolq"]["n"] == 5
    assert set(res["boolq"]) == {"acc", "acc_stderr", "n", "per_item"}
    assert [json.loads(x)["question"] for x in (tmp_path / "boolq.jsonl").read_text().splitlines()] == \
        [it["question"] for it in interleave_labels(load_boolq_jsonl(BUILTIN_BOOLQ))]  # boolq_balanced: yes/no/yes/...
    run_harness(model, tok, {"limit": 5, "boolq_balanced": False}, tmp_path)
    assert [json.loads(x)["question"] for x in (tmp_path / "boolq.jsonl").read_text().splitlines()] == \
        [it["question"] for it in load_boolq_jsonl(BUILTIN_BOOLQ)]
    assert run_harness(model, tok, {"limit": 0.5, "boolq_path": "builtin"}, tmp_path)["boolq"]["n"] == 12


def test_modes_rng_and_weights_untouched(setup, tmp_path):
    model, tok = setup.model, setup.tok
    model.train()
    model.model.layers[0].eval()  # a mixed pattern must come back as it was
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    run_harness(model, tok, {"boolq_path": str(setup.data), "limit": 2}, tmp_path)
    score_yes_no(model, tok, ITEMS[:2])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()


class _QuackingLM(torch.nn.Module):
    """Not a PreTrainedModel: .config/.device/.dtype and forward(input_ids, attention_mask) -> .logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.lm(input_ids=input_ids, attention_mask=attention_mask).logits)


def test_module_that_quacks_like_a_model(setup, tmp_path):
    wrapped = _QuackingLM(setup.model)
    res = run_harness(wrapped, setup.tok, {"boolq_path": str(setup.data), "boolq_balanced": False}, tmp_path)
    assert res["boolq"]["acc"] == pytest.approx(setup.acc)
    assert score_yes_no(wrapped, setup.tok, ITEMS) == setup.preds


def test_local_template_matches_stock_boolq():
    yaml = pytest.importorskip("yaml")
    import lm_eval

    stock_path = Path(lm_eval.__file__).parent / "tasks" / "super_glue" / "boolq" / "default.yaml"
    if not stock_path.is_file():
        pytest.skip("this lm-eval has no super_glue/boolq/default.yaml")
    stock = yaml.safe_load(stock_path.read_text())
    ours = yaml.safe_load((TASK_TEMPLATES / "boolq_local.yaml").read_text())
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice"):
        assert ours[key] == stock[key], key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in stock["metric_list"]]
    assert ours.get("target_delimiter", " ") == stock.get("target_delimiter", " ")
    assert ours["metadata"]["version"] == stock["metadata"]["version"]
    assert boolq_prompt({"passage": "P", "question": "q"}) == "P\nQuestion: q?\nAnswer:"


def test_builtin_boolq_file():
    items = load_boolq_jsonl(BUILTIN_BOOLQ)
    assert len(items) == 24
    assert sum(it["label"] for it in items) == 12
    assert len({it["idx"] for it in items}) == 24


def test_config_checks(tmp_path):
    assert resolve_harness_cfg(None)["tasks"] == ["boolq"]
    assert resolve_harness_cfg({"tasks": "boolq, lambada_openai"})["tasks"] == ["boolq", "lambada_openai"]
    with pytest.raises(GainError, match="unknown eval.harness key"):
        resolve_harness_cfg({"limt": 3})
    with pytest.raises(GainError, match="limit"):
        resolve_harness_cfg({"limit": -1})
    with pytest.raises(GainError, match="batch_size"):
        resolve_harness_cfg({"batch_size": 0})
    with pytest.raises(GainError, match="boolq_path"):
        run_harness(torch.nn.Linear(1, 1), _tokenizer(True), {"boolq_path": str(tmp_path / "nope.jsonl")}, tmp_path)
    from omegaconf import OmegaConf

    block = OmegaConf.create({"enabled": True, "tasks": ["boolq"], "boolq_path": None, "limit": 4, "batch_size": 2,
                              "num_fewshot": 0})
    assert resolve_harness_cfg(block) == {**resolve_harness_cfg(None), "limit": 4, "batch_size": 2}
    assert run_harness(torch.nn.Linear(1, 1), None, {"enabled": False}, tmp_path) == {}
    assert run_harness(torch.nn.Linear(1, 1), None, {"tasks": []}, tmp_path) == {}


def test_boolq_source_choice(monkeypatch, tmp_path):
    """Local file when given or when the hub is offline; the stock hub task (None) only online without a path."""
    data = _write_items(tmp_path / "b.jsonl")
    assert boolq_source({"boolq_path": str(data)}) == data.resolve()
    assert boolq_source({"boolq_path": "builtin"}) == BUILTIN_BOOLQ
    assert boolq_source({"boolq_path": None}) == BUILTIN_BOOLQ  # conftest: offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert boolq_source({"boolq_path": None}) is None
    assert boolq_source({"boolq_path": str(data)}) == data.resolve()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert boolq_source({}) == BUILTIN_BOOLQ


@pytest.mark.parametrize("wrap", [False, True])
def test_next_token_logprobs_equal_a_masked_full_forward(setup, wrap):
    """The fast path (right pads, no mask, LM head only at each row's last position) changes no number."""
    from gain_cli.evaluation.harness import (_accepts_logits_to_keep, _forward_logprobs, _needs_attention_mask,
                                             _next_token_logprobs)

    model = _QuackingLM(setup.model) if wrap else setup.model
    assert _accepts_logits_to_keep(model) is (not wrap)
    rows = [setup.tok.encode(boolq_prompt(it)) for it in ITEMS[:5]]
    assert len({len(r) for r in rows}) > 1  # real padding
    pad = setup.tok.pad_token_id
    with torch.no_grad():
        fast = _next_token_logprobs(model, rows, pad, _needs_attention_mask(model), _accepts_logits_to_keep(model))
        full = _forward_logprobs(model, rows, pad)
    expect = torch.stack([full[i, len(r) - 1] for i, r in enumerate(rows)])
    assert fast.shape == expect.shape
    torch.testing.assert_close(fast, expect, rtol=0, atol=1e-5)


def test_lm_eval_git_probe_is_silent_outside_a_checkout(tmp_path, monkeypatch, capfd):
    """Run outside a git checkout: lm-eval's `git describe` prints nothing ("fatal: not a git repository")."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    tok = _tokenizer(True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path either
    capfd.readouterr()
    run_harness(_model(tok, 0), tok, {"limit": 2}, tmp_path / "w")
    captured = capfd.readouterr()
    assert "not a git repository" not in captured.err + captured.out
    assert evaluator.get_git_commit_hash is original  # lm-eval's own probe is back afterwards
    original()  # ... which does print here (so the assertion above can fail)
    assert "not a git repository" in capfd.readouterr().err


GPU_TASKS = ["boolq", "hellaswag", "winogrande", "piqa", "arc_easy", "arc_challenge", "openbookqa"]


def test_gpu_eval_config_lists_the_seven_tasks_zero_shot():
    """The GPU recipes' eval config: the seven tasks of the summaries, 0-shot each (our default), names lm-eval's
    local index knows (no download: HF_*_OFFLINE are set)."""
    from omegaconf import OmegaConf

    from gain_cli.config import compose_config
    from gain_cli.evaluation.harness import check_task_names

    for recipe in ("mistral-7b_8domains", "qwen2.5_8domains"):
        block = OmegaConf.to_container(compose_config([], recipe).eval.harness, resolve=True)
        assert block["tasks"] == GPU_TASKS, recipe
        assert resolve_harness_cfg(block)["num_fewshot"] == dict.fromkeys(GPU_TASKS, 0)
    shots = compose_config(["eval.harness.num_fewshot.hellaswag=10", "eval.harness.tasks=[boolq,hellaswag]"],
                           "mistral-7b_8domains").eval.harness
    assert resolve_harness_cfg(OmegaConf.to_container(shots))["num_fewshot"] == {"boolq": 0, "hellaswag": 10}
    check_task_names(GPU_TASKS)
    with pytest.raises(GainError, match="unknown task 'hellaswagg'.*close: hellaswag"):
        check_task_names(["hellaswagg"])


def test_installed_lm_eval_loads_the_seven_without_dataset_scripts():
    """datasets >= 4 refuses dataset loading scripts: the installed lm-eval's seven task YAMLs (piqa above all, which
    lm-eval <= 0.4.9 read through a script) must name script-free hub datasets and no trust_remote_code."""
    yaml = pytest.importorskip("yaml")
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    files = {"boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
             "winogrande": "winogrande/default.yaml", "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
             "openbookqa": "openbookqa/openbookqa.yaml"}  # arc_challenge includes arc_easy.yaml
    for task, rel in files.items():
        text = (root / rel).read_text()
        cfg = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
        assert cfg["task"] == task
        assert "/" in cfg["dataset_path"], (task, cfg["dataset_path"])    # an org/name hub repo, not a script name
        assert "trust_remote_code" not in text, task
    assert yaml.safe_load((root / "piqa/piqa.yaml").read_text())["dataset_path"] == "baber/piqa"


def test_a_dataset_script_is_one_line(tmp_path):
    """A task whose data needs a loading script (refused by datasets >= 4) fails with one line and the way out."""
    import datasets

    if int(datasets.__version__.split(".")[0]) < 4:
        pytest.skip("datasets < 4 still runs loading scripts")
    script_dir = tmp_path / "scripted"
    script_dir.mkdir()
    (script_dir / "scripted.py").write_text("import datasets\n")
    task = tmp_path / "scripted_task.yaml"
    task.write_text(f"task: scripted_task\ndataset_path: {script_dir}\noutput_type: multiple_choice\n"
                    "validation_split: validation\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n")
    tok = _tokenizer(True)
    with pytest.raises(GainError, match="dataset script, which datasets >= 4 refuses.*lm-eval >= 0.4.10"):
        run_harness(_model(tok, 0), tok, {"tasks": [str(task)]}, tmp_path / "w")
