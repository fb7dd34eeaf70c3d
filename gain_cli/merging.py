"""`gain merge`: rebuild a run's model after stage K and save it as a plain Hugging Face model."""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from gain_cli.errors import GainError


def merge_run(run_dir: str | Path, out: str | Path, stage: int | None = None) -> Path:
    from gain_cli.methods import build_method
    from gain_cli.models.loading import load_model, model_spec
    from gain_cli.runner import apply_saved_stages, finished_stages

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise GainError(f"{run_dir} is not a gain run directory (no config.yaml)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    done = finished_stages(run_dir)
    if not done:
        raise GainError(f"{run_dir} has no finished stage to merge")
    k = done[-1] if stage is None else int(stage)
    if k not in done:
        raise GainError(f"stage {k} of {run_dir} is not finished (finished: {', '.join(map(str, done))})")
    model, tokenizer = load_model(cfg.model, cfg.cache_dir)
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
    if not method.mergeable:
        raise GainError(f"method '{method.name}' cannot be merged into a single plain model "
                        "(it evaluates two branches); use `gain eval --run` instead")
    model = apply_saved_stages(model, method, run_dir, k)
    model = method.merge(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
