"""The Accelerate config files a launcher names (``launcher.accelerate_config``): where they are, and which
sharding they ask for. Read by the launcher, the memory estimate and ``train.sharding``'s resolution."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from gain_cli.config_files import configs_dir
from gain_cli.errors import GainError


def resolve_accelerate_config(name_or_path: str) -> Path:
    """``fsdp`` → <configs>/accelerate/fsdp.yaml; otherwise a path (relative to the working directory)."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_file():
        return p.resolve()
    shipped_file = configs_dir() / "accelerate" / f"{p.name[:-5] if p.name.endswith('.yaml') else p.name}.yaml"
    if p.parent == Path(".") and shipped_file.is_file():
        return shipped_file.resolve()
    shipped = sorted(q.stem for q in (configs_dir() / "accelerate").glob("*.yaml"))
    raise GainError(f"launcher.accelerate_config '{name_or_path}' is neither a file nor one of the shipped "
                    f"configs ({', '.join(shipped) or 'none'})")


def sharding_of(accelerate_config: str | None) -> str:
    """'fsdp', 'zero3' or 'none' from an Accelerate config file (a name under configs/accelerate/ or a path)."""
    if not accelerate_config:
        return "none"
    cfg = OmegaConf.to_container(OmegaConf.load(resolve_accelerate_config(accelerate_config)))
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp"  # estimated as full sharding (weights, gradients and optimizer states split N ways)
    if kind == "DEEPSPEED":
        stage = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0))
        return "zero3" if stage == 3 else "none"
    return "none"
