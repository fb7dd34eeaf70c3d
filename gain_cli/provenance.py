"""What a run records about where it ran (``run_info.json``): config hash, git commit, library versions, host."""

from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from gain_cli.config import config_hash
from gain_cli.training.drift import is_drift


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("gain-cli", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "hydra-core"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_info(cfg, num_processes: int, status: str, started: str | None = None, sharding: str = "none",
             param_bytes_per_process: int | None = None) -> dict[str, Any]:
    """The run's ``run_info.json`` (``status``: running | complete | interrupted | failed)."""
    shard = {"sharding": sharding}
    if param_bytes_per_process is not None:  # measured on the sharded model (largest rank)
        shard["param_bytes_per_process"] = param_bytes_per_process
    return {
        "recipe": cfg.recipe, "method": cfg.method.name, "model": cfg.model.name, "domains": list(cfg.domains.sequence),
        "seed": int(cfg.seed), "num_processes": num_processes, **shard, "status": status,
        **({"domain_schedule": "drift"} if is_drift(cfg) else {}),
        "config_hash": config_hash(cfg), "git_commit": git_commit(), "versions": library_versions(),
        "host": socket.gethostname(), "started": started or datetime.now().isoformat(timespec="seconds"),
        "updated": datetime.now().isoformat(timespec="seconds"),
    }
