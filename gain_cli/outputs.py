"""Where a command writes (``--out``): never over a user's own files.

A command that writes a directory of results (``gain merge --out``, ``gain report --out``, ``gain bench --out``,
``gain data build`` into ``domains.root``)
first claims it with ``claim_output_dir``: a new or empty directory is fine, and so is one that gain wrote before
(it holds the marker file ``.gain-output.json``, written by ``mark_output_dir`` when the command finishes); a
file, or a non-empty directory that gain did not write, is refused in one line and left as it was, unless the user
passes ``--overwrite``. ``--out .`` means the current directory, under the same rule.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gain_cli.errors import GainError
from gain_cli.io import apply_umask, atomic_write_json

MARKER = ".gain-output.json"


def claim_output_dir(out: str | Path, command: str, overwrite: bool = False, *, option: str = "--out",
                     gain_files: tuple[str, ...] = ()) -> Path:
    """The absolute directory ``command`` may write into (see the module docstring); nothing is created yet.
    ``option`` names where the path came from; ``gain_files``: other files that show gain wrote the directory."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise GainError(f"{option} {out} is a file, not a directory: {command} writes a directory (nothing was changed)")
    ours = any((path / f).is_file() for f in (MARKER, *gain_files))
    if path.is_dir() and any(path.iterdir()) and not ours and not overwrite:
        raise GainError(f"{option} {out} is a non-empty directory that gain did not write: {command} refuses to write "
                        "into it (nothing was changed); choose a new or empty directory, or pass --overwrite")
    check_creatable(path.parent, f"{option} {out}")  # the new output is written beside it, then renamed
    return path


def check_creatable(path: Path, what: str, hint: str = "") -> None:
    """One line unless ``path`` exists as a directory or can be made: its nearest existing ancestor must be a
    writable directory (``what`` names it in the message, ``hint`` says what to do instead)."""
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GainError(f"{what} lies under {ancestor}, which is a file{hint}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise GainError(f"{what} cannot be written: {ancestor} is not writable{hint}")


def mark_output_dir(path: Path, command: str, **info) -> None:
    """Record that ``command`` wrote ``path`` (a later run of a gain command may replace it)."""
    atomic_write_json(path / MARKER, {"command": command, **info})


def write_output_dir(out: Path, command: str, write, what: str, **marker) -> None:
    """Write a command's output directory ``out`` (claimed with ``claim_output_dir``) safely: ``write(tmp)`` fills a
    temporary directory beside it, which is marked (``mark_output_dir`` with ``marker``) and moved into place only
    when complete; it is removed on every failure, and an OS error is one line naming ``what`` was written."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        mark_output_dir(tmp, command, **marker)
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GainError(f"cannot write {what} to {out}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` (which ``claim_output_dir`` allowed), files at the umask's
    permissions."""
    apply_umask(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
