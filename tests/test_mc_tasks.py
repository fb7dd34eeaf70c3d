"""Any lm-eval multiple-choice task per stage, offline: two hand-made local tasks in lm-eval's formats (tests/data: a
4-choice set read by a task YAML, a 2-choice set as a bare JSONL task file, a dozen items each) through lm-eval like
the stock tasks; the one-pass scorer's per-item choices against lm-eval's (fp32, bf16, bf16 near ties); and a
tiny `gain run` + `gain report` on them: harness matrices, curves, drop metrics, per-task few-shot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gain_cli.errors import GainError
from gain_cli.evaluation.harness import (choice_loglikelihoods, harness_results, pick_choice, resolve_harness_cfg,
                                         score_multiple_choice, task_file, task_label)
from gain_cli.evaluation.jsonl_tasks import load_task_jsonl

DATA = Path(__file__).resolve().parent / "data"
MC4, MC2 = DATA / "tiny_mc4.jsonl", DATA / "tiny_mc2.jsonl"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def mc4_yaml(directory: Path) -> Path:
    """lm-eval's own task format for the 4-choice set (fields question / choices / label), like its ARC task."""
    path = directory / "tiny_mc4.yaml"
    path.write_text(f"""task: tiny_mc4
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {MC4}
output_type: multiple_choice
validation_split: validation
fewshot_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _tokenizer():
    """Byte-level BPE trained in-process on both tasks' prompts and answers: every choice is one token after its
    prompt (the fast scorer's one-pass case)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Question: {d['question']}\nAnswer: {c}" for d in _lines(MC4) for c in d["choices"]]
    corpus += [f"{d['query']} {c}" for d in _lines(MC2) for c in d["choices"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS, PAD], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def _model(tok, seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _samples(raw, task):
    return sorted(raw["samples"][task], key=lambda s: s["doc_id"])


def _lm_eval_picks(raw, task, norm=False):
    """lm-eval's own per-doc pick: argmax of the choices' log-likelihoods (/ choice length for acc_norm)."""
    out = []
    for s in _samples(raw, task):
        lls = [r[0] for r in s["filtered_resps"]]
        choices = [c[1:] for _ctx, c in s["arguments"]] if norm else None
        out.append(pick_choice(lls, choices))
    return out


def _items(raw, task):
    """(context, choices) of each doc as lm-eval built its requests (choices without the target delimiter)."""
    out = []
    for s in _samples(raw, task):
        ctxs = {ctx for ctx, _ in s["arguments"]}
        assert len(ctxs) == 1
        out.append((ctxs.pop(), [c[1:] for _ctx, c in s["arguments"]]))
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return [str(mc4_yaml(d)), str(MC2)]


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def test_the_task_files(tok):
    assert [len(d["choices"]) for d in _lines(MC4)] == [4] * 12
    kind, items = load_task_jsonl(MC2)
    assert kind == "multiple_choice" and len(items) == 12 and sum(it["gold"] for it in items) == 6
    for d in _lines(MC4):  # every choice one token after its prompt: the one-pass case
        ctx = tok.encode(f"Question: {d['question']}\nAnswer:")
        assert all(len(tok.encode(f"Question: {d['question']}\nAnswer: {c}")) == len(ctx) + 1 for c in d["choices"])
    for d in _lines(MC2):
        assert all(len(tok.encode(f"{d['query']} {c}")) == len(tok.encode(d["query"])) + 1 for c in d["choices"])


@pytest.fixture(scope="module")
def fp32_results(tok, tasks, tmp_path_factory):
    """lm-eval's results for both tasks on the first tiny model (seed) whose picks are mixed on both."""
    work = tmp_path_factory.mktemp("h32")
    for seed in range(20):
        model = _model(tok, seed)
        raw = harness_results(model, tok, {"tasks": tasks, "batch_size": 5}, work, log_samples=True)
        if all(len(set(_lm_eval_picks(raw, t))) > 1 for t in ("tiny_mc4", "tiny_mc2")):
            return model, raw, work
    raise AssertionError("no seed gives mixed picks on both tasks")


def test_local_tasks_report_lm_evals_metrics(fp32_results):
    _model_, raw, _ = fp32_results
    for task, n_choices in (("tiny_mc4", 4), ("tiny_mc2", 2)):
        res = raw["results"][task]
        assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(res)
        assert raw["n-samples"][task]["effective"] == 12
        samples = _samples(raw, task)
        assert all(len(s["arguments"]) == n_choices for s in samples)
        assert res["acc,none"] == pytest.approx(np.mean([s["acc"] for s in samples]))
        # lm-eval's stderr of a mean of 0/1 items: sample standard deviation / sqrt(n)
        assert res["acc_stderr,none"] == pytest.approx(np.std([s["acc"] for s in samples], ddof=1) / np.sqrt(12))
    # the JSONL convention: query as the context, " " + choice as each continuation
    first = _samples(raw, "tiny_mc2")[0]
    assert [tuple(a) for a in first["arguments"]] == [(_lines(MC2)[0]["query"], " true"),
                                                     (_lines(MC2)[0]["query"], " false")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_scorer_makes_lm_evals_choices(fp32_results, tok, tasks, tmp_path, dtype):
    model, raw, _ = fp32_results
    if dtype != torch.float32:
        model = _model(tok, 0, dtype)
        raw = harness_results(model, tok, {"tasks": tasks, "batch_size": 5}, tmp_path / "lm", log_samples=True)
    fast = harness_results(model, tok, {"tasks": tasks, "batch_size": 5}, tmp_path / "fast", log_samples=True,
                           fast=True)
    for task in ("tiny_mc4", "tiny_mc2"):
        # the same (log-likelihood, is_greedy) per request, hence the same metrics
        assert [s["filtered_resps"] for s in _samples(fast, task)] == [s["filtered_resps"] for s in _samples(raw, task)]
        assert fast["results"][task] == raw["results"][task]
        items = _items(raw, task)
        for norm in (False, True):
            assert score_multiple_choice(model, tok, items, batch_size=3, norm=norm) == _lm_eval_picks(raw, task, norm)
        # alone (other batches than lm-eval's, which held both tasks' requests) the numbers agree to the last few
        # bits; equal batches give equal numbers (the fast harness run above)
        lls = choice_loglikelihoods(model, tok, items, batch_size=4)
        expect = [[r[0] for r in s["filtered_resps"]] for s in _samples(raw, task)]
        np.testing.assert_allclose(lls, expect, rtol=1e-5 if dtype == torch.float32 else 1e-2)


def _near_tie_model(tok):
    """A bf16 tiny model whose " true" and " false" logits differ by about one bf16 step at the logits' scale, far
    below one at the log-probabilities' (around -10): lm-eval's bf16 log-softmax ties most items (argmax: the first
    choice), an fp32 log-softmax of the same logits separates them."""
    model = _model(tok, 3)
    t, f = tok.encode(" true")[-1], tok.encode(" false")[-1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.lm_head.weight
        w[t] = 0.05 * torch.randn(w.shape[1], generator=g)
        w[f] = w[t] + 0.002 * torch.randn(w.shape[1], generator=g)
    return model.to(torch.bfloat16), t, f


def test_bf16_near_ties_are_lm_evals(tok, tmp_path):
    model, t_id, f_id = _near_tie_model(tok)
    raw = harness_results(model, tok, {"tasks": [str(MC2)], "batch_size": 4}, tmp_path, log_samples=True)
    lm_eval = _lm_eval_picks(raw, "tiny_mc2")
    lls = [[r[0] for r in s["filtered_resps"]] for s in _samples(raw, "tiny_mc2")]
    assert sum(a == b for a, b in lls) >= 3  # exact ties in lm-eval's bf16 log-probabilities
    items = _items(raw, "tiny_mc2")
    assert score_multiple_choice(model, tok, items, batch_size=4) == lm_eval
    # the old fast path's log-softmax in fp32 of the same logits picks otherwise on the tied items
    fp32_picks = []
    with torch.no_grad():
        for ctx, _choices in items:
            lp = torch.log_softmax(model(torch.tensor([tok.encode(ctx)])).logits[0, -1].float(), dim=-1)
            fp32_picks.append(int(lp[f_id] > lp[t_id]))  # choice 0 = true, 1 = false
    assert sum(a != b for a, b in zip(fp32_picks, lm_eval)) >= 1


def test_config_num_fewshot_per_task_and_task_files(tasks, tmp_path):
    cfg = resolve_harness_cfg({"tasks": ["boolq", *tasks], "num_fewshot": {"tiny_mc2": 3}, "limit": {"tiny_mc4": 5}})
    assert cfg["num_fewshot"] == {"boolq": 0, tasks[0]: 0, tasks[1]: 3}   # keyed by entry; a task not named: 0
    assert cfg["limit"] == {"boolq": None, tasks[0]: 5, tasks[1]: None}
    assert [task_label(t) for t in tasks] == ["tiny_mc4", "tiny_mc2"]
    assert resolve_harness_cfg({"tasks": tasks, "num_fewshot": {tasks[1]: None}})["num_fewshot"][tasks[1]] is None
    # a per-task table may name tasks the run leaves out (the GPU config's seven, tasks=[boolq]): left out
    assert resolve_harness_cfg({"tasks": ["boolq"], "num_fewshot": {"piqa": 5, "boolq": 1}})["num_fewshot"] == \
        {"boolq": 1}
    with pytest.raises(GainError, match=r"num_fewshot\.boolq must be null or an integer"):
        resolve_harness_cfg({"tasks": ["boolq"], "num_fewshot": {"boolq": -1}})
    with pytest.raises(GainError, match="twice"):
        resolve_harness_cfg({"tasks": tasks, "num_fewshot": {"tiny_mc2": 1, tasks[1]: 2}})
    with pytest.raises(GainError, match="does not exist"):
        task_file(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("line, expect", [
    ('{"query": "q", "choices": ["a"], "gold": 0}', "at least 2"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "index of the right choice"),
    ('{"query": "q", "choices": ["a", "b"]}', "index of the right choice"),
    ('{"query": "", "choices": ["a", "b"], "gold": 0}', "'query' must be a non-empty string"),
    ('{"query": "q", "target": " t"}', "one kind per file"),
    ('{"question": "q", "answer": "a"}', "needs 'query' and 'choices'"),
])
def test_malformed_jsonl_task_names_the_line(tmp_path, line, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(GainError, match=rf"bad\.jsonl:2: .*{expect}"):
        load_task_jsonl(path)


def test_jsonl_loglikelihood_task(tok, tmp_path):
    path = tmp_path / "tiny_ll.jsonl"
    path.write_text("".join(json.dumps({"query": d["query"], "target": " true"}) + "\n" for d in _lines(MC2)[:4]))
    raw = harness_results(_model(tok, 0), tok, {"tasks": [str(path)]}, tmp_path / "w", log_samples=True)
    assert {"acc,none", "perplexity,none"} <= set(raw["results"]["tiny_ll"])
    assert _samples(raw, "tiny_ll")[0]["arguments"][0][1] == " true"


# --------------------------------------------------------------------------------------------- a run and its report

cli = CliRunner()


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory, tasks):
    from gain_cli.cli import app

    rd = tmp_path_factory.mktemp("mcrun") / "run"
    res = cli.invoke(app, ["run", "recipe=tiny_8domains", "method=gain_ffn", "domains.sequence=[dna,code]",
                           "train.steps=4", "eval.max_blocks=2", f"eval.harness.tasks=[{tasks[0]},{tasks[1]}]",
                           "eval.harness.num_fewshot={tiny_mc2: 2}", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def test_run_writes_a_matrix_per_task_and_metric(mc_run):
    acc = json.loads((mc_run / "harness_matrix.json").read_text())
    assert acc["tasks"] == ["tiny_mc4", "tiny_mc2"] and len(acc["rows"]) == 3
    for metric in ("acc_stderr", "acc_norm", "acc_norm_stderr"):
        m = json.loads((mc_run / f"harness_matrix_{metric}.json").read_text())
        assert m["tasks"] == acc["tasks"] and all(isinstance(v, float) for row in m["values"] for v in row), metric
    row_dirs = (mc_run / "base", mc_run / "stages" / "stage_1", mc_run / "stages" / "stage_2")
    for row, row_dir in zip(acc["values"], row_dirs):
        res = json.loads(next((row_dir / "lm_eval").rglob("results_*.json")).read_text())
        assert row == [res["results"][t]["acc,none"] for t in acc["tasks"]]
        assert res["n-shot"] == {"tiny_mc4": 0, "tiny_mc2": 2}   # eval.harness.num_fewshot per task


def test_report_draws_every_task_and_its_drops(mc_run, tmp_path):
    from gain_cli.cli import app
    from gain_cli.reporting.matrices import load_run

    out = tmp_path / "rep"
    res = cli.invoke(app, ["report", str(mc_run), "--out", str(out), "--format", "csv"])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    for task in ("tiny_mc4", "tiny_mc2"):
        for fig in (f"figures/{task}_curve.png", f"figures/{task}_acc_norm_curve.png"):
            assert f"]({fig})" in md and (out / fig).stat().st_size > 100, fig
    run = load_run(mc_run)
    acc, norm = run.harness, run.harness_extra["acc_norm"]
    js = json.loads((out / "metrics.json").read_text())["runs"][0]
    with open(out / "metrics_downstream_change.csv", newline="") as f:
        (table,) = list(csv.DictReader(f))
    drops = []
    for task in ("tiny_mc4", "tiny_mc2"):
        drop, drop_norm = 100 * (acc[task][2] - acc[task][0]), 100 * (norm[task][2] - norm[task][0])
        drops.append(drop)
        assert js["metrics"]["harness"][task]["drop_points"] == pytest.approx(drop)
        assert js["harness_drops"]["acc_norm"][task]["drop_points"] == pytest.approx(drop_norm)
        assert float(table[f"{task} Δ acc pts ↑"]) == pytest.approx(drop)
        assert float(table[f"{task} Δ acc_norm pts ↑"]) == pytest.approx(drop_norm)
    assert float(table["mean Δ acc pts ↑"]) == pytest.approx(np.mean(drops))
    with open(out / "metrics.csv", newline="") as f:
        (summary,) = list(csv.DictReader(f))
    assert float(summary["tiny_mc2 Δ vs base pts ↑"]) == pytest.approx(drops[1])
