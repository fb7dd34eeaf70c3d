"""A domain's documents on disk: one JSON object ``{"text": ...}`` per line (UTF-8), written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from gain_cli.errors import GainError
from gain_cli.io import atomic_write_text


def write_documents(path: Path, docs: Iterable[str]) -> None:
    atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))


def read_documents(path: Path) -> list[str]:
    docs = []
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    docs.append(obj["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise GainError(f"{path}:{i}: expected a JSON object with a 'text' field "
                                    f"({type(exc).__name__})") from exc
    except UnicodeDecodeError as exc:
        raise GainError(f"{path}:{i}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1}); "
                        "domain files are UTF-8 JSON lines") from exc
    except OSError as exc:
        raise GainError(f"cannot read domain file {path}: {exc.strerror or exc}") from exc
    return docs
