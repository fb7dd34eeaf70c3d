"""Domain data: make sure each domain's files exist, read them, tokenise once (cached), pack.

On disk every domain is `<root>/<domain>/{train,validation}.jsonl`, one `{"text": ...}` per line.
``domains.source`` says how missing files are made:
  tiny  — generated locally (gain_cli.data.tiny)
  demo  — built from registry packages (gain_cli.data.demo, `gain data build demo`)
  files — must already exist
  hub   — downloaded once from the Hugging Face hub with `datasets` (``domains.hub.<domain>``)
Token streams are cached as .npy under ``<cache_dir>/tokens`` keyed by file content and tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gain_cli.data.demo import DEMO_DOMAINS, build_demo, is_complete
from gain_cli.data.documents import read_documents, write_documents
from gain_cli.data.tiny import GENERATORS, build_tiny
from gain_cli.errors import GainError, unknown_choice
from gain_cli.io import atomic_write_with
from gain_cli.schemas.run import DomainsConfig

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Domain:
    name: str
    train: Path
    validation: Path

    def path(self, split: str) -> Path:
        return self.train if split == "train" else self.validation


def domain_files(root: Path, name: str) -> Domain:
    return Domain(name, root / name / "train.jsonl", root / name / "validation.jsonl")


def ensure_domains(domains_cfg: Mapping[str, Any], cache_dir: str | Path, log=print, overwrite: bool = False) -> list[Domain]:
    """Return the domains of the sequence, building missing data when the source can (a demo build refuses a
    non-empty ``domains.root`` that gain did not build, unless ``overwrite``)."""
    domains_cfg = DomainsConfig.of(domains_cfg)  # source, a non-empty sequence without repeats: checked there
    source, sequence = domains_cfg.source, list(domains_cfg.sequence)
    root = Path(str(domains_cfg.root))
    domains = [domain_files(root, d) for d in sequence]
    missing = [d for d in domains if not (d.train.is_file() and d.validation.is_file())]
    if source == "tiny":
        unknown = [d for d in sequence if d not in GENERATORS]
        if unknown:
            raise unknown_choice("domain", unknown[0], GENERATORS)
        if missing:
            log(f"generating {len(missing)} tiny domain(s) in {root} (once; later runs reuse them)")
            build_tiny(root, [d.name for d in missing])
    elif source == "demo":
        if not is_complete(root):
            unknown = [d for d in sequence if d not in DEMO_DOMAINS]
            if unknown:
                raise unknown_choice("domain", unknown[0], DEMO_DOMAINS)
            log(f"building the demo domains in {root} (once; later runs reuse them)")
            build_demo(root, Path(cache_dir) / "downloads", overwrite=overwrite, log=log)
    elif source == "hub" and missing:
        for d in missing:
            _materialize_hub(domains_cfg, d, log)
    for d in domains:
        for split in SPLITS:
            if not d.path(split).is_file():
                available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                raise GainError(
                    f"missing data file {d.path(split)} for domain '{d.name}'"
                    + (f" (domains present in {root}: {', '.join(available)})" if available else f" ({root} does not exist)")
                )
    return domains


def _materialize_hub(domains_cfg: Mapping[str, Any], d: Domain, log) -> None:
    spec = DomainsConfig.of(domains_cfg).hub.get(d.name)
    if not spec:
        raise GainError(f"domain '{d.name}' has no entry under domains.hub (dataset path, name, revision, splits, "
                        "text_field)")
    from datasets import load_dataset

    field = spec.get("text_field", "text")
    for split, key, default in (("train", "train_split", "train"), ("validation", "validation_split", "validation")):
        log(f"downloading {spec['path']} [{spec.get(key, default)}] for domain '{d.name}'")
        try:
            ds = load_dataset(spec["path"], spec.get("name"), split=spec.get(key, default), revision=spec.get("revision"))
        except RuntimeError as exc:  # datasets >= 4 refuses loading scripts
            if "scripts are no longer supported" not in str(exc):
                raise
            raise GainError(f"dataset {spec['path']} (domain '{d.name}') needs a loading script, which datasets >= 4 "
                            "refuses: point domains.hub." f"{d.name} at a parquet copy, or at the hub's parquet "
                            "conversion with revision: refs/convert/parquet") from exc
        if field not in ds.column_names:
            raise GainError(f"dataset {spec['path']} has no field '{field}' (fields: {', '.join(ds.column_names)})")
        write_documents(d.path(split), (t for t in ds[field] if t and t.strip()))


# --- tokenisation and packing -----------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    desc = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())[:5000])
    return hashlib.sha256((desc + str(tokenizer.eos_token_id)).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise GainError(f"cannot read domain file {path}: {exc.strerror or exc}") from exc
    return h.hexdigest()[:16]


def token_stream(path: Path, tokenizer, cache_dir: str | Path | None) -> np.ndarray:
    """All documents of a split tokenised and joined, an EOS after each document (cached)."""
    key = f"{_file_digest(path)}-{tokenizer_fingerprint(tokenizer)}"
    cached = Path(cache_dir) / "tokens" / f"{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    docs = read_documents(path)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GainError("the tokenizer has no EOS token, needed to separate documents")
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for seq in tokenizer(docs[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
    arr = np.asarray(ids, dtype=np.int32 if len(tokenizer) < 2**31 else np.int64)
    if cached is not None:
        atomic_write_with(cached, lambda p: np.save(open(p, "wb"), arr))
    return arr


def pack(stream: np.ndarray, block: int, max_blocks: int | None = None, *, what: str = "") -> torch.Tensor:
    """Non-overlapping blocks of ``block`` tokens (the tail that does not fill a block is dropped)."""
    n = len(stream) // block
    if n == 0:
        raise GainError(f"{what or 'data'} has {len(stream)} tokens; at least {block} are needed for one block "
                        f"of {block} tokens (add text or lower the block/sequence length)")
    if max_blocks is not None:
        n = min(n, int(max_blocks))
    return torch.from_numpy(stream[: n * block].astype(np.int64)).view(n, block)


class DomainData:
    """Tokenised, packed splits of every domain, computed once per run (no re-tokenising per stage)."""

    def __init__(self, domains: list[Domain], tokenizer, cache_dir: str | Path | None):
        self.domains = {d.name: d for d in domains}
        self.tokenizer = tokenizer
        self.cache_dir = cache_dir
        self._streams: dict[tuple[str, str], np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def stream(self, name: str, split: str) -> np.ndarray:
        if (name, split) not in self._streams:
            self._streams[(name, split)] = token_stream(self.domains[name].path(split), self.tokenizer, self.cache_dir)
        return self._streams[(name, split)]

    def blocks(self, name: str, split: str, block: int, max_blocks: int | None = None) -> torch.Tensor:
        return pack(self.stream(name, split), block, max_blocks, what=f"domain '{name}' ({split} split)")
