"""A LAMBADA-style last-word cloze set from the quotations of Debian's ``fortunes`` package.

Each item is ``{"text": passage, "idx": i}`` in lm-eval's LAMBADA format: ``text`` ends with the word to predict,
without its closing punctuation; the context is ``text`` minus its last space-separated word, the target is
``" " + last word`` (gain_cli/evaluation/tasks/cloze_local.yaml). How a fortune becomes an item:

1. Fortune files hold quotations separated by lines of ``%``. Only the categories in ``CLOZE_CATEGORIES`` are read:
   none that overlaps a demo training domain (computers, linux, debian, perl, law, medicine, science, goedel, tao,
   songs-poems, definitions ...) and none of the joke files about groups of people (ethnic, men-women, drugs).
2. The attribution (the first line starting with ``--`` and everything after it) is cut off; lines are joined with
   single spaces.
3. Quotations naming a training domain's subject (``OVERLAP_WORDS``: the Bible, Shakespeare, computers, law,
   medicine, mathematics ...) are skipped too, wherever they are filed.
4. The passage must have ``MIN_WORDS``-``MAX_WORDS`` words (LAMBADA's passages are ~4-5 sentences, ~75 words) and
   end in a lower-case alphabetic word of at least 3 letters, followed only by ``. ! ? " '`` (a real word, not a
   name, number or a word cut by a dash); that closing punctuation is dropped.
5. Duplicates (same words, any case or spacing; some quotations are filed twice) are kept once; at most ``n`` items
   are chosen and ordered by a salted hash of their text, so the file is a deterministic, spread-out sample.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from gain_cli.data import demo_fetch as F
from gain_cli.data.demo_text import digest
from gain_cli.errors import GainError

FORTUNES_PACKAGES = ("fortunes-min", "fortunes")   # fortunes-min has literature; fortunes the rest
FORTUNES_DIR = "usr/share/games/fortunes"
CLOZE_CATEGORIES = ("art", "education", "food", "humorists", "kids", "literature", "love", "miscellaneous", "people",
                    "pets", "platitudes", "politics", "sports", "wisdom", "work")
MIN_WORDS = 30
MAX_WORDS = 150
CLOZE_ITEMS = 500
OVERLAP_WORDS = re.compile(
    r"\b(bible|biblical|scripture|gospel|jesus|christ|god|lord|psalms?|apostles?|moses|testament|"
    r"shakespeare|hamlet|macbeth|romeo|juliet|othello|falstaff|"
    r"computers?|software|programs?|programm\w*|unix|linux|kernel|hackers?|internet|"
    r"law|laws|lawyers?|attorneys?|court|judges?|licen[cs]es?|copyright|"
    r"doctors?|medical|medicine|hospital|patients?|disease|surgeon|"
    r"mathematic\w*|theorem|proof|equations?)\b", re.I)
_ATTRIBUTION = re.compile(r"^\s*(--|\u2014)")
_ENDING = re.compile(r"^(?P<context>.*\S) (?P<word>[a-z]{3,})[.!?\"']*$")


def fortune_passages(text: str) -> Iterator[str]:
    """A fortune file → its quotations without attributions, each on one line (whitespace collapsed)."""
    for block in re.split(r"^%\s*$", text, flags=re.M):
        body = []
        for line in block.split("\n"):
            if _ATTRIBUTION.match(line):
                break
            body.append(line)
        passage = re.sub(r"\s+", " ", " ".join(body)).strip()
        if passage:
            yield passage


def cloze_text(passage: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """A quotation → the item's ``text`` (ends with the target word, closing punctuation dropped), or None."""
    if OVERLAP_WORDS.search(passage):
        return None
    n = len(passage.split(" "))
    if not min_words <= n <= max_words:
        return None
    m = _ENDING.match(passage)
    if not m:
        return None
    return f"{m.group('context')} {m.group('word')}"


def select_cloze(texts: Iterable[str], n: int = CLOZE_ITEMS) -> list[dict]:
    """Deduplicated (case and spacing ignored), at most ``n``, ordered by a salted hash: ``{"text", "idx"}``."""
    seen, unique = set(), []
    for t in texts:
        key = " ".join(t.lower().split())
        if key not in seen:
            seen.add(key)
            unique.append(t)
    chosen = sorted(unique, key=lambda t: digest(t, "gain-demo-cloze"))[:n]
    return [{"text": t, "idx": i} for i, t in enumerate(chosen)]


def cloze_from_files(files: dict[str, str], n: int = CLOZE_ITEMS) -> tuple[list[dict], dict[str, int]]:
    """(items, quotations read per category) from ``{category: file text}`` in ``CLOZE_CATEGORIES`` order."""
    texts, counts = [], {}
    for cat in CLOZE_CATEGORIES:
        if cat not in files:
            continue
        passages = list(fortune_passages(files[cat]))
        counts[cat] = len(passages)
        texts += [t for t in (cloze_text(p) for p in passages) if t]
    return select_cloze(texts, n), counts


def fetch_cloze(dl: Path, log, n: int = CLOZE_ITEMS) -> tuple[list[dict], dict]:
    """(cloze items, their sources.json record) from Debian ``fortunes`` (``literature`` is in ``fortunes-min``)."""
    members = [f"{FORTUNES_DIR}/{c}" for c in CLOZE_CATEGORIES]
    debs = [F.apt_download(pkg, dl, log) for pkg in FORTUNES_PACKAGES]
    roots = [F.extract_deb(deb, dl, members) for deb in debs]
    files = {}
    for cat in CLOZE_CATEGORIES:
        found = [r / FORTUNES_DIR / cat for r in roots if (r / FORTUNES_DIR / cat).is_file()]
        if not found:
            raise GainError(f"Debian packages {' and '.join(d.name for d in debs)} have no fortune file {cat}")
        files[cat] = found[0].read_text(encoding="utf-8", errors="replace")
    items, counts = cloze_from_files(files, n)
    versions = sorted({F.deb_version(d) for d in debs})
    record = {"registry": "debian", "package": " + ".join(FORTUNES_PACKAGES), "version": ", ".join(versions),
              "file_or_path": f"{FORTUNES_DIR}/{{{','.join(CLOZE_CATEGORIES)}}} ({sum(counts.values())} quotations; "
                              f"{MIN_WORDS}-{MAX_WORDS} words, ending in a lower-case word)",
              "licence": "BSD-4-Clause-UC (fortune-mod, University of California; debian/copyright); "
                         "the quotations are short excerpts of their authors' works"}
    return items, record
