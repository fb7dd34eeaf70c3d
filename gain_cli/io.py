"""Atomic, crash-safe file writes: write to a temp file beside the target, fsync, rename.

A reader never sees a half-written file: either the old content or the new one.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gain_cli import faults
from gain_cli.errors import GainError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What a plain open() would create. mkstemp's temporary files are private (0600), and renaming one into place
# would leave every result, cache and data file readable by its owner only.
_FILE_MODE = 0o666 & ~_umask()


def apply_umask(tree: Path) -> None:
    """Give every file under ``tree`` the permissions a plain ``open()`` gives (libraries that write through private
    temporary files, as ``save_pretrained`` does for safetensors, leave 0600)."""
    for f in Path(tree).rglob("*"):
        if f.is_file():
            os.chmod(f, _FILE_MODE)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then atomically move the result to ``path`` (with the permissions a plain
    ``open()`` gives a new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, _FILE_MODE)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GainError(f"no space left on the device while writing {path}; the previous version of the file "
                            "is intact: free some space and resume") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_csv(path: str | os.PathLike, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_with(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path`` while the block runs; no lock on non-POSIX systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_jsonl_objects(path: str | os.PathLike, what: str, expected: str) -> list[tuple[str, dict]]:
    """The JSON objects of a JSONL file, each with its ``file:line`` (blank lines skipped). GainError naming the file
    (and line) when it is missing, a line is not JSON or not an object, or it holds none; ``what`` names the kind of
    file ("BoolQ file"), ``expected`` what an object needs ("fields question, passage, label")."""
    import json

    p = Path(path).expanduser()
    if not p.is_file():
        raise GainError(f"{what} '{p}' does not exist")
    out: list[tuple[str, dict]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GainError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise GainError(f"{where}: expected a JSON object with {expected}")
            out.append((where, obj))
    if not out:
        raise GainError(f"{what} '{p}' has no items")
    return out


def file_slug(s: str, empty: str = "x") -> str:
    """``s`` as a file-name part: runs of other characters than letters, digits, ``.``, ``_`` and ``-`` become
    ``_`` (``empty`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or empty
