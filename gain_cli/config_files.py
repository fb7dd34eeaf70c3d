"""Where gain's config files are: ``configs/`` (the groups) and ``recipes/``, shipped inside the installed package
(hatch force-include) and read from the source tree in an editable install. Imports nothing of gain but its
errors, so that every module that needs a shipped file (Accelerate configs, method YAMLs) can find it."""

from __future__ import annotations

from pathlib import Path

from gain_cli.errors import GainError


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def config_root() -> Path:
    """Directory holding `configs/` and `recipes/` (package dir when installed, repo root when editable)."""
    pkg = _package_dir()
    for root in (pkg, pkg.parent):
        if (root / "configs" / "config.yaml").is_file():
            return root
    raise GainError(f"gain's configs/ directory was not found next to {pkg}; reinstall the package")


def configs_dir() -> Path:
    return config_root() / "configs"


def recipes_dir() -> Path:
    return config_root() / "recipes"
