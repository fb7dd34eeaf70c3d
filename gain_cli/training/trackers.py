"""Experiment trackers (``train.log_with``): Accelerate's own (TensorBoard, W&B, MLflow, ...), fed by the run.

``train.log_with: null`` (default) logs nothing beyond the run directory. ``tensorboard`` (the optional extra
``pip install 'gain-cli[tensorboard]'``) writes event files under ``<run_dir>/trackers/``; ``wandb`` logs to W&B
(``WANDB_MODE=offline`` keeps it on disk, ``wandb sync`` uploads later); any other name Accelerate knows works the
same way, several as a list. What is logged, on one x-axis of global optimiser steps (stage K's step s is
``(K-1)·train.steps + s``; row 0 is step 0):

* every ``train.log_every`` steps: ``train/loss``, ``train/lr``, ``train/tokens_per_s`` (with ``stage``);
* after each row's evaluation: ``ppl/<domain>`` for every domain, ``harness/<task>/<metric>`` and the row's
  own-domain PPL ``ppl/own``.

The run's main settings go in as the tracker's hyperparameters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from gain_cli.errors import GainError
from gain_cli.schemas.run import TrainConfig

# what each tracker needs installed (Accelerate's names), and how to get it
PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install 'gain-cli[tensorboard]'"),
            "wandb": (("wandb",), "pip install wandb"), "mlflow": (("mlflow",), "pip install mlflow"),
            "comet_ml": (("comet_ml",), "pip install comet_ml"), "aim": (("aim",), "pip install aim"),
            "clearml": (("clearml",), "pip install clearml"), "dvclive": (("dvclive",), "pip install dvclive")}


def requested_trackers(train_cfg) -> list[str]:
    value = TrainConfig.of(train_cfg).log_with
    if value in (None, "", "none"):
        return []
    names = [str(v) for v in (value if isinstance(value, (list, tuple, ListConfig)) else [value])]
    for name in names:
        if name not in PACKAGES:
            raise GainError(f"unknown train.log_with '{name}' (valid: null, {', '.join(PACKAGES)}, or a list of them)")
        modules, how = PACKAGES[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise GainError(f"train.log_with={name} needs the {modules[0]} package, which is not installed: {how}")
    return names


def hyperparameters(cfg) -> dict[str, Any]:
    """Flat scalars a tracker can show as the run's hyperparameters."""
    method = cfg.method
    out = {"recipe": str(cfg.recipe), "model": str(cfg.model.name), "method": str(method.name),
           "lr": float(method.lr), "seed": int(cfg.seed), "steps_per_stage": int(cfg.train.steps),
           "batch_size": int(cfg.train.batch_size), "grad_accum": int(cfg.train.grad_accum),
           "seq_len": int(cfg.train.seq_len), "domains": ",".join(str(d) for d in cfg.domains.sequence)}
    for key in ("r", "alpha", "modules", "l2", "lam"):
        if method.get(key) is not None:
            out[f"method.{key}"] = method[key] if isinstance(method[key], (int, float, bool)) else str(method[key])
    return out


class Trackers:
    """The run's trackers on its Accelerator (a no-op when ``train.log_with`` is null)."""

    def __init__(self, accelerator, cfg, run_dir: Path):
        self.acc, self.steps = accelerator, int(cfg.train.steps)
        self.names = requested_trackers(cfg.train)
        if not self.names:
            return
        from accelerate.tracking import filter_trackers

        accelerator.project_configuration.set_directories(str(run_dir / "trackers"))
        accelerator.log_with = filter_trackers(self.names, accelerator.logging_dir)
        accelerator.init_trackers(run_dir.name, config=hyperparameters(cfg))

    @property
    def active(self) -> bool:
        return bool(self.names)

    def global_step(self, stage: int, step: int) -> int:
        return (stage - 1) * self.steps + step

    def train_step(self, rec: dict[str, Any]) -> None:
        if self.active:
            self.acc.log({"train/loss": rec["loss"], "train/lr": rec["lr"], "train/tokens_per_s": rec["tokens_per_s"],
                          "stage": rec["stage"]}, step=self.global_step(int(rec["stage"]), int(rec["step"])))

    def row(self, stage: int, row: dict[str, Any], domain: str | None = None) -> None:
        if not self.active:
            return
        values = {f"ppl/{d}": float(v) for d, v in (row.get("ppl") or {}).items()}
        if domain is not None and domain in (row.get("ppl") or {}):
            values["ppl/own"] = float(row["ppl"][domain])
        for task, res in (row.get("harness") or {}).items():
            for metric, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and metric != "n":
                    values[f"harness/{task}/{metric}"] = float(v)
        self.acc.log(values, step=stage * self.steps)

    def close(self) -> None:
        """Finish the trackers (not ``accelerator.end_training()``, which also destroys the process group that the
        next run of this process, or the rest of a launched run, still uses)."""
        if self.active:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []
