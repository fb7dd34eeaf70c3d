"""Evaluation throughput: our perplexity sweep vs lm-eval's rolling log-likelihood, and the BoolQ pass.

Perplexity, identical windows: blocks of ``B-1`` tokens are cut from the domain's cached token stream, decoded to
text and kept only where lm-eval's own encoding of that text gives back exactly the same ids. lm-eval
(``HFLM.loglikelihood_rolling``, ``max_length=B``) then scores each text as one window — its prefix token followed
by the text, predicting every token of the text — and our sweep (``evaluate_blocks``) scores the blocks
``[prefix] + ids``: the same B-1 predictions from the same contexts. Times: ours on the cached token blocks (how a
run evaluates every stage), lm-eval from the text (how it is called: it tokenises each time). Both in the same
precision and batch size; optionally a second pair under bf16 autocast on both sides.

BoolQ: ``run_harness`` (lm-eval's ``simple_evaluate`` with the stock BoolQ prompt on the local file) vs
``score_yes_no`` (one forward per batch of prompts when " yes" and " no" are single tokens), end to end per call,
and the per-item choices compared (lm-eval's per-sample log-likelihoods, argmax with ties to "no").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gain_cli.bench.timing import (
    interleaved,
    median,
    paired_ratio,
    rel_diff,
    spread,
    timed,
)
from gain_cli.errors import GainError
from gain_cli.evaluation.harness import (
    BOOLQ_CHOICES,
    BUILTIN_BOOLQ,
    TARGET_DELIMITER,
    HarnessModelAdapter,
    _HFLMFactory,
    _quiet_lmeval,
    boolq_prompt,
    harness_results,
    load_boolq_jsonl,
    run_harness,
    score_yes_no,
)
from gain_cli.evaluation.perplexity import block_nll, evaluate_blocks


def bench_lm(model, tokenizer, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None):
    """lm-eval's HFLM around the model object (as gain's harness builds it), progress bars off."""
    base = _HFLMFactory.get()

    class BenchHFLM(base):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    kw: dict[str, Any] = {"max_length": max_length} if max_length else {}
    if dtype is not None:
        kw["mixed_precision_dtype"] = dtype
    with _quiet_lmeval(False):
        return BenchHFLM(pretrained=HarnessModelAdapter(model), tokenizer=tokenizer, batch_size=batch_size,
                         max_batch_size=64, **kw)


def matched_windows(lm, tokenizer, stream, block: int, n: int) -> tuple[list[str], torch.Tensor, int]:
    """(texts, our blocks [n, block] = prefix + ids, blocks skipped because the text does not re-encode to the same ids)."""
    import numpy as np

    prefix = int(lm.prefix_token_id)
    texts, rows, skipped = [], [], 0
    width = block - 1
    for start in range(0, len(stream) - width + 1, width):
        ids = [int(t) for t in np.asarray(stream[start:start + width])]
        text = tokenizer.decode(ids)
        if lm.tok_encode(text) != ids:
            skipped += 1
            continue
        texts.append(text)
        rows.append([prefix] + ids)
        if len(texts) == n:
            break
    if not texts:
        raise GainError("no block of the benchmark text re-encodes to the same token ids; cannot match lm-eval's windows")
    return texts, torch.tensor(rows, dtype=torch.long), skipped


def rolling_requests(texts: list[str]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]


@torch.inference_mode()
def per_window_nll(model, blocks: torch.Tensor, batch_size: int, autocast_dtype=None) -> list[float]:
    model.eval()
    out: list[float] = []
    for i in range(0, blocks.shape[0], batch_size):
        out += block_nll(model, blocks[i:i + batch_size], autocast_dtype).double().sum(1).tolist()
    return out


def rates_vs_lm_eval(ours: list[float], lm_eval: list[float]) -> dict[str, Any]:
    """Medians, the order-balanced ratio, the samples and their spread of our rates against lm-eval's."""
    return {"ours_tokens_per_s": round(median(ours), 1), "lm_eval_tokens_per_s": round(median(lm_eval), 1),
            "ratio": round(paired_ratio(ours, lm_eval), 3), "ours_samples": [round(x, 1) for x in ours],
            "lm_eval_samples": [round(x, 1) for x in lm_eval],
            "spread": {"ours": round(spread(ours), 3), "lm_eval": round(spread(lm_eval), 3)}}


def bench_perplexity(model, tokenizer, stream, s, repeats: int, log=print) -> dict[str, Any]:
    lm = bench_lm(model, tokenizer, s.eval_batch, max_length=s.eval_seq)
    texts, blocks, skipped = matched_windows(lm, tokenizer, stream, s.eval_seq, s.eval_windows)
    reqs = rolling_requests(texts)
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)

    # agreement (untimed): per-window NLL of ours vs lm-eval's log-likelihood of the same window
    ours_nll = per_window_nll(model, blocks, s.eval_batch)
    lm_ll = lm.loglikelihood_rolling(rolling_requests(texts))
    diffs = [abs(a + b) for a, b in zip(ours_nll, lm_ll)]
    out: dict[str, Any] = {
        "windows": len(texts), "window_tokens": int(blocks.shape[1]), "predicted_tokens": int(tokens),
        "batch_size": s.eval_batch, "skipped_blocks_not_roundtripping": skipped,
        "nll_sum_ours": sum(ours_nll), "nll_sum_lm_eval": -sum(lm_ll),
        "nll_max_abs_diff_per_window": max(diffs),
        "nll_rel_diff_total": rel_diff(sum(ours_nll), -sum(lm_ll)),
        "ppl_ours": float(torch.tensor(sum(ours_nll) / tokens).exp()),
    }
    variants = ([("fp32", None, False)] + ([("bf16", torch.bfloat16, False)] if s.eval_bf16 else [])
                + ([("fp32_compiled", None, True)] if s.eval_compile else []))
    for name, dt, compiled in variants:
        lm_v = lm if dt is None else bench_lm(model, tokenizer, s.eval_batch, max_length=s.eval_seq, dtype=dt)
        warmup_seconds, _ = timed(lambda: evaluate_blocks(model, blocks[: s.eval_batch], s.eval_batch,
                                                          autocast_dtype=dt, compile=compiled))
        lm_v.loglikelihood_rolling(rolling_requests(texts[: s.eval_batch]))
        res = interleaved({
            "ours": lambda dt=dt, c=compiled: evaluate_blocks(model, blocks, s.eval_batch, autocast_dtype=dt, compile=c),
            "lm_eval": lambda lm_v=lm_v: lm_v.loglikelihood_rolling(reqs),
        }, repeats)
        row = rates_vs_lm_eval([tokens / t for t, _ in res["ours"]], [tokens / t for t, _ in res["lm_eval"]])
        if name != "fp32":
            row["nll_rel_diff_vs_fp32"] = rel_diff(res["ours"][0][1].nll_sum, sum(ours_nll))
            row["lm_eval_nll_rel_diff_vs_fp32"] = rel_diff(-sum(res["lm_eval"][0][1]), sum(ours_nll))
        if compiled:  # the first sweep's compile, beyond the time a warm-up batch takes
            row["ours_compile_seconds"] = round(max(0.0, warmup_seconds - s.eval_batch * (blocks.shape[1] - 1)
                                                    / row["ours_tokens_per_s"]), 1)
        out[name] = row
        log(f"  perplexity {name}: ours {row['ours_tokens_per_s']:.0f} tok/s, lm-eval {row['lm_eval_tokens_per_s']:.0f} tok/s")
    lm._model = None
    return out


def _lm_eval_choices(results: dict[str, Any]) -> list[int]:
    samples = sorted(results["samples"]["boolq"], key=lambda x: x["doc_id"])
    choices = []
    for smp in samples:
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in smp["filtered_resps"]]
        choices.append(max(range(len(lls)), key=lambda k: (lls[k], -k)))  # first of equal maxima, like argmax
    return choices


def bench_boolq(model, tokenizer, s, repeats: int, workdir: Path, log=print) -> dict[str, Any]:
    items = load_boolq_jsonl(BUILTIN_BOOLQ)
    if s.boolq_items:
        items = items[: s.boolq_items]
    path = workdir / "boolq_bench.jsonl"
    path.write_text("".join(json.dumps({"question": it["question"], "passage": it["passage"],
                                        "label": bool(it["label"]), "idx": it["idx"]}) + "\n" for it in items))
    cfg = {"tasks": ["boolq"], "boolq_path": str(path), "batch_size": s.boolq_batch, "bootstrap_iters": 0,
           "boolq_balanced": False}  # file order, as score_yes_no reads the items: the two are compared item by item
    prompt_tokens = [len(tokenizer.encode(boolq_prompt(it))) for it in items]
    tokens = sum(prompt_tokens) + len(items)  # every prompt, plus the one answer token each side scores
    p0 = boolq_prompt(items[0])
    ctx = tokenizer.encode(p0)
    single = all(len(tokenizer.encode(p0 + TARGET_DELIMITER + c)) - len(ctx) == 1 for c in BOOLQ_CHOICES)

    hdir = workdir / "harness"
    results = harness_results(model, tokenizer, cfg, hdir, log_samples=True)  # also the warm-up
    lm_choices = _lm_eval_choices(results)
    ours_choices = score_yes_no(model, tokenizer, items, batch_size=s.boolq_batch)
    res = interleaved({
        "ours": lambda: score_yes_no(model, tokenizer, items, batch_size=s.boolq_batch),
        "lm_eval": lambda: run_harness(model, tokenizer, cfg, hdir),
    }, repeats)
    o = [tokens / t for t, _ in res["ours"]]
    e = [tokens / t for t, _ in res["lm_eval"]]
    acc_lm = results["results"]["boolq"].get("acc,none")
    acc_ours = sum(int(c == int(it["label"])) for c, it in zip(ours_choices, items)) / len(items)
    out = {
        "items": len(items), "tokens": tokens, "batch_size": s.boolq_batch,
        "single_token_continuations": single, **rates_vs_lm_eval(o, e),
        "ours_items_per_s": round(median(o) * len(items) / tokens, 2),
        "lm_eval_items_per_s": round(median(e) * len(items) / tokens, 2),
        "choices_equal": ours_choices == lm_choices,
        "choices_differing": sum(int(a != b) for a, b in zip(ours_choices, lm_choices)),
        "acc_ours": acc_ours, "acc_lm_eval": acc_lm,
    }
    log(f"  boolq: ours {out['ours_tokens_per_s']:.0f} tok/s, lm-eval {out['lm_eval_tokens_per_s']:.0f} tok/s, "
        f"choices equal: {out['choices_equal']}")
    return out
