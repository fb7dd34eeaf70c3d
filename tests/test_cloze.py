"""gain's local `cloze` task (LAMBADA-style last word): its builder from fortune files, its loader, its scoring through
lm-eval on a tiny model (checked against a direct greedy computation), and BoolQ's balanced order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gain_cli.data.cloze import cloze_from_files, cloze_text, fortune_passages, select_cloze
from gain_cli.errors import GainError
from gain_cli.evaluation.cloze import BUILTIN_CLOZE, CLOZE_TEMPLATE, cloze_split, load_cloze_jsonl
from gain_cli.evaluation.harness import harness_results, interleave_labels, run_harness

EOS, PAD = "<|endoftext|>", "<|pad|>"

TEXTS = [
    "the cat sat on the warm mat by the door",
    "the dog ran to the park and played with the ball",
    "she drank a cup of hot tea in the quiet garden",
    "the old man read the morning paper at the table",
    "the bird sang a song in the tall green tree",
    "we walked along the river until the sun went down",
]

# --- builder ------------------------------------------------------------------------------------------------

LONG = " ".join(["word"] * 29)
FORTUNES = (
    f"{LONG} and then it rained.\n\t\t-- Somebody Famous\n%\n"          # attribution cut, '.' dropped
    f"{LONG}\nand the river ran dry!\"\n%\n"                             # lines joined, '!"' dropped
    f"{LONG} the computer crashed.\n%\n"                                 # names a training domain's subject
    "Too short to give any context at all.\n%\n"                         # < 30 words
    f"{LONG} we met Smith.\n%\n"                                         # ends in a capitalised word (a name)
    f"{LONG} in 1999.\n%\n"                                              # not a word
    f"{LONG} AND THEN IT RAINED.\n"                                      # different case: kept (not lower-case end)
)


def test_fortune_passages_and_cloze_text():
    passages = list(fortune_passages(FORTUNES))
    assert len(passages) == 7
    assert passages[0] == f"{LONG} and then it rained."
    assert passages[1] == f"{LONG} and the river ran dry!\""
    assert [cloze_text(p) for p in passages] == [
        f"{LONG} and then it rained", f"{LONG} and the river ran dry", None, None, None, None, None]


def test_cloze_from_files_dedups_orders_by_hash_and_caps():
    dup = f"{LONG} and then it rained.\n%\n{LONG}   and then IT rained!\n"
    items, counts = cloze_from_files({"art": FORTUNES, "food": dup, "computers": FORTUNES})
    assert counts == {"art": 7, "food": 2}           # only listed categories are read
    assert sorted(it["text"] for it in items) == [f"{LONG} and the river ran dry", f"{LONG} and then it rained"]
    assert [it["idx"] for it in items] == [0, 1]
    assert select_cloze([it["text"] for it in reversed(items)]) == items   # order is the hash's, not the input's
    assert len(select_cloze([it["text"] for it in items], n=1)) == 1


# --- loader -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line3, expect", [
    ('{"txt": "a b"}', "field 'text' must be a non-empty string"),
    ('{"text": "   "}', "field 'text' must be a non-empty string"),
    ('{"text": "oneword"}', "needs a context and a last word"),
    ('{"text": "ends with a space "}', "needs a context and a last word"),
    ('{"text": "a b"', "not valid JSON"),
    ('["a b"]', "expected a JSON object"),
])
def test_malformed_cloze_file_names_the_line(tmp_path, line3, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "a b"}}\n\n{line3}\n')
    with pytest.raises(GainError, match=rf"bad\.jsonl:3: .*{expect}") as exc:
        load_cloze_jsonl(path)
    assert "\n" not in str(exc.value)


def test_cloze_file_errors_through_the_harness(tmp_path):
    with pytest.raises(GainError, match="cloze_path"):
        run_harness(torch.nn.Linear(1, 1), _tokenizer(), {"tasks": ["cloze"], "cloze_path": str(tmp_path / "no")},
                    tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GainError, match="has no items"):
        load_cloze_jsonl(tmp_path / "empty.jsonl")


def test_builtin_cloze_file_and_split():
    items = load_cloze_jsonl(BUILTIN_CLOZE)
    assert len(items) == 16 and [it["idx"] for it in items] == list(range(16))
    assert cloze_split(items[0]["text"]) == ("She opened the umbrella because it had started to", " rain")


def test_template_matches_stock_lambada():
    yaml = pytest.importorskip("yaml")
    import lm_eval

    stock_path = Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml"
    if not stock_path.is_file():
        pytest.skip("this lm-eval has no lambada/lambada_openai.yaml")
    stock, ours = yaml.safe_load(stock_path.read_text()), yaml.safe_load(CLOZE_TEMPLATE.read_text())
    for key in ("output_type", "doc_to_text", "doc_to_target", "metric_list"):
        assert ours[key] == stock[key], key
    assert ours["metadata"]["version"] == stock["metadata"]["version"] and ours["task"] == "cloze"


# --- scoring through lm-eval on a tiny model ----------------------------------------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 120, special_tokens=[EOS, PAD], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(TEXTS[::2] * 3, trainer)  # merges from half the texts: targets of one and of several tokens
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


@torch.no_grad()
def _greedy_hits(model, tok, texts):
    """1.0 where one forward of context+target puts the argmax on every target token, as lm-eval encodes them."""
    out = []
    for text in texts:
        context, target = cloze_split(text)
        ctx = tok.encode(context)
        cont = tok.encode(context + target)[len(ctx):]
        logits = model(torch.tensor([ctx + cont])).logits[0]
        pred = logits[len(ctx) - 1: len(ctx) - 1 + len(cont)].argmax(-1).tolist()
        out.append(float(pred == cont))
    return out


def _partly_trained(tok):
    """A tiny Llama trained on TEXTS until some (not all) last words are its greedy continuation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = [torch.tensor([tok.encode(t)]) for t in TEXTS[::2]]   # the odd texts stay unseen
    for _ in range(60):
        for ids in rows:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        hits = _greedy_hits(model, tok, TEXTS)
        model.train()
        if 0 < sum(hits) < len(hits):
            return model.eval(), hits
    raise AssertionError("training never gave mixed greedy hits")


def test_cloze_acc_is_lmeval_is_greedy(tmp_path):
    tok = _tokenizer()
    lens = {len(tok.encode(cloze_split(t)[0] + cloze_split(t)[1])) - len(tok.encode(cloze_split(t)[0])) for t in TEXTS}
    assert 1 in lens and max(lens) > 1            # single- and multi-token targets
    model, hits = _partly_trained(tok)
    data = tmp_path / "cloze.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = {"tasks": ["cloze"], "cloze_path": str(data), "batch_size": 4}
    res = run_harness(model, tok, cfg, tmp_path / "w")["cloze"]
    assert res["per_item"] == hits
    assert res["n"] == len(TEXTS) and res["acc"] == pytest.approx(sum(hits) / len(hits))
    assert res["perplexity"] > 1
    raw = harness_results(model, tok, cfg, tmp_path / "w", log_samples=True)
    args = [tuple(s["arguments"][0]) for s in sorted(raw["samples"]["cloze"], key=lambda s: s["doc_id"])]
    assert args == [cloze_split(t) for t in TEXTS]
    both = run_harness(model, tok, {**cfg, "tasks": ["boolq", "cloze"], "boolq_path": "builtin", "limit": 4},
                       tmp_path / "w2")
    assert set(both) == {"boolq", "cloze"} and both["cloze"]["per_item"] == hits[:4]


# --- BoolQ: balanced order -------------------------------------------------------------------------------------

def test_interleave_labels_balances_every_prefix():
    items = [{"label": lab, "i": i} for i, lab in enumerate([True, True, True, False, True, False, True])]
    out = interleave_labels(items)
    assert [it["i"] for it in out] == [0, 3, 1, 5, 2, 4, 6]
    for n in range(1, 5):
        assert sum(it["label"] for it in out[:n]) == (n + 1) // 2
