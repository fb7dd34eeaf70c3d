"""Pure text functions of the demo data build: clean, deduplicate, chunk, split, cap (no I/O, no network).

A domain's raw material is a sequence of *units* (a book chapter, a source file, a licence, a dictionary entry).
``prepare_documents`` turns them into documents of a few KB:

1. ``clean_text``: Unicode NFC, ``\\n`` line ends, no control characters, no trailing spaces, at most one blank line.
2. ``dedup_paragraphs``: a paragraph (text between blank lines) of at least ``min_chars`` characters that was already
   seen earlier in the domain is dropped (licence boilerplate repeated in source files, the many near-identical SPDX
   licences); short ones ("Exeunt.", "return None") are kept, they are not duplication but style.
3. ``chunk_unit``: paragraphs packed greedily into chunks of at most ``target`` characters; a paragraph longer than
   ``max_chars`` is cut at line ends (and a line longer than that at spaces).
4. ``pack_small``: consecutive short chunks (dictionary entries, ontology terms) joined up to ``target``.
5. ``dedup_documents``: exact duplicate documents (after whitespace normalisation) dropped, first one kept.

``split_documents`` assigns each document to train or validation by a hash of its text (not a random draw), and
``cap_documents`` keeps the documents with the smallest order-hash until a byte budget is reached, so the result is
the same on every machine and run for the same input, and a document never moves between splits when caps change.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\u2028\u2029]")
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_PARA_SPLIT = re.compile(r"\n(?:[ \t]*\n)+")
_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise one unit of text (see the module doc); returns '' for blank input."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n").rstrip()


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` (separated by blank lines), blank ones dropped, inner lines kept as they are."""
    return [p.strip("\n") for p in _PARA_SPLIT.split(text) if p.strip()]


def normalize_ws(text: str) -> str:
    """The comparison key of dedup: whitespace runs collapsed to one space."""
    return _WS.sub(" ", text).strip()


def digest(text: str, salt: str = "") -> int:
    """A stable 64-bit integer from sha256(salt + NUL + text)."""
    return int.from_bytes(hashlib.sha256(salt.encode() + b"\0" + text.encode("utf-8")).digest()[:8], "big")


def dedup_paragraphs(units: Iterable[str], min_chars: int = 100) -> list[str]:
    """Drop, across all ``units``, every repeat of a paragraph of at least ``min_chars`` characters.

    Units left without any paragraph are dropped. Paragraphs keep their inner line breaks and indentation.
    """
    seen: set[int] = set()
    out = []
    for unit in units:
        kept = []
        for p in split_paragraphs(unit):
            if len(p) >= min_chars:
                key = digest(normalize_ws(p))
                if key in seen:
                    continue
                seen.add(key)
            kept.append(p)
        if kept:
            out.append("\n\n".join(kept))
    return out


def _split_long(text: str, max_chars: int, sep: str, hard: bool = True) -> list[str]:
    """Greedy pieces of ``text`` of at most ``max_chars`` characters, cut at ``sep``.

    A single part longer than the limit is cut hard when ``hard``, else left whole (for a finer separator later).
    """
    pieces: list[str] = []
    cur = ""
    for part in text.split(sep):
        if not hard and len(part) > max_chars:
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(part)
            continue
        while len(part) > max_chars:  # a single part longer than the limit: hard cut
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(part[:max_chars])
            part = part[max_chars:]
        if cur and len(cur) + len(sep) + len(part) > max_chars:
            pieces.append(cur)
            cur = part
        else:
            cur = f"{cur}{sep}{part}" if cur else part
    if cur:
        pieces.append(cur)
    return [p for p in pieces if p.strip()]


def split_long_paragraph(par: str, max_chars: int) -> list[str]:
    """Cut a paragraph longer than ``max_chars`` at line ends, and over-long lines at spaces."""
    if len(par) <= max_chars:
        return [par]
    out = []
    for piece in _split_long(par, max_chars, "\n", hard=False):
        out.extend(_split_long(piece, max_chars, " ") if len(piece) > max_chars else [piece])
    return out


def chunk_unit(text: str, target: int = 2000, max_chars: int = 4000) -> list[str]:
    """Pack the paragraphs of one unit greedily into chunks of at most ``target`` characters.

    A paragraph longer than ``target`` becomes a chunk of its own, cut into pieces if it exceeds ``max_chars``;
    a short last chunk is joined to the one before when the two fit in ``max_chars``.
    """
    if target > max_chars:
        raise ValueError("target must not exceed max_chars")
    chunks: list[str] = []
    cur = ""
    for par in split_paragraphs(text):
        for piece in split_long_paragraph(par, max_chars):
            if cur and len(cur) + 2 + len(piece) > target:
                chunks.append(cur)
                cur = piece
            else:
                cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        if chunks and len(cur) < target // 2 and len(chunks[-1]) + 2 + len(cur) <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{cur}"
        else:
            chunks.append(cur)
    return chunks


def pack_small(docs: Iterable[str], target: int = 2000) -> list[str]:
    """Join consecutive documents (blank line between) while the result stays within ``target`` characters."""
    out: list[str] = []
    cur = ""
    for d in docs:
        if cur and len(cur) + 2 + len(d) <= target:
            cur = f"{cur}\n\n{d}"
        else:
            if cur:
                out.append(cur)
            cur = d
    if cur:
        out.append(cur)
    return out


def dedup_documents(docs: Iterable[str]) -> list[str]:
    """Exact duplicates (after whitespace normalisation) removed; the first occurrence is kept, order unchanged."""
    seen: set[int] = set()
    out = []
    for d in docs:
        key = digest(normalize_ws(d))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def prepare_documents(units: Iterable[str], *, target: int = 2000, max_chars: int = 4000,
                      min_doc_chars: int = 200, dedup_min_chars: int = 100) -> list[str]:
    """Units → cleaned, deduplicated documents of about ``target`` characters (see the module doc)."""
    cleaned = (clean_text(u) for u in units)
    unique = dedup_paragraphs((u for u in cleaned if u), min_chars=dedup_min_chars)
    chunks = [c for u in unique for c in chunk_unit(u, target, max_chars)]
    docs = dedup_documents(pack_small(chunks, target))
    return [d for d in docs if len(d) >= min_doc_chars]


def is_validation(doc: str, fraction: float) -> bool:
    """Deterministic split: the document's hash (salted 'split') falls in the first ``fraction`` of the range."""
    return digest(doc, "gain-demo-split") < fraction * 2**64


def split_documents(docs: Iterable[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by ``is_validation``; order within each split unchanged."""
    train, val = [], []
    for d in docs:
        (val if is_validation(d, fraction) else train).append(d)
    return train, val


def cap_documents(docs: Iterable[str], max_bytes: int | None) -> list[str]:
    """Documents in order of their hash (salted 'order'), kept while their UTF-8 bytes (+1 per line) fit ``max_bytes``.

    The order is itself a deterministic shuffle, so a capped split is a spread-out sample of the domain.
    """
    ordered = sorted(docs, key=lambda d: (digest(d, "gain-demo-order"), d))
    if max_bytes is None:
        return ordered
    out, total = [], 0
    for d in ordered:
        n = len(d.encode("utf-8")) + 1
        if total + n > max_bytes:
            continue  # a smaller document further on may still fit
        out.append(d)
        total += n
    return out
