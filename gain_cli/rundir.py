"""A run directory: the one place that knows its layout. Every command that reopens a run goes through ``RunDir``.

Layout::

    config.yaml            resolved config           run_info.json   versions, commit, hash, status
    ppl_matrix.{csv,json}  rows = base + stages, columns = domains (training order)
    harness_matrix.{csv,json}   lm-eval accuracies per row (when eval.harness.enabled)
    train_log.jsonl        step logs                  report/         per-run report
    timing.json            seconds, tokens and FLOPs per phase of each session
    .lock                  the process that runs it (removed when it stops)
    base/metrics.json      row 0
    stages/stage_K/method_state.safetensors   the method's trained state of stage K
    stages/stage_K/metrics.json               training stats + row K (written last: marks K as finished)

A stage counts as finished once its ``metrics.json`` exists. ``RunDir.apply_saved_stages`` rebuilds the model
after stage K from the base model and the saved states (through the method's own attach / load / finish hooks);
``RunDir.model_after`` also loads the base model and builds the run's method.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from gain_cli.config import config_differences, config_hash, load_saved_config
from gain_cli.errors import GainError
from gain_cli.io import atomic_write_json, read_json
from gain_cli.outputs import check_creatable

if TYPE_CHECKING:
    import torch

CONFIG = "config.yaml"
INFO = "run_info.json"
LOCK = ".lock"
METRICS = "metrics.json"
STATE_FILE = "method_state.safetensors"
TRAIN_FILE = "train.json"  # what training a stage reported, saved with its state
PPL_MATRIX = "ppl_matrix"  # written as .json and .csv
HARNESS_MATRIX = "harness_matrix"
TRAIN_LOG = "train_log.jsonl"
TIMING_FILE = "timing.json"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # --- layout -----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def info_path(self) -> Path:
        return self.path / INFO

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def train_log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def timing_path(self) -> Path:
        return self.path / TIMING_FILE

    def matrix_path(self, name: str = PPL_MATRIX, suffix: str = ".json") -> Path:
        """``ppl_matrix.json`` (default), ``harness_matrix.json``, ``harness_matrix_<metric>.json``, ``.csv``."""
        return self.path / f"{name}{suffix}"

    def stage_dir(self, k: int) -> Path:
        return self.path / "stages" / f"stage_{k}"

    def row_dir(self, k: int) -> Path:
        """Where row ``k``'s files go: ``base/`` for row 0, ``stages/stage_K/`` for stage K."""
        return self.path / "base" if k == 0 else self.stage_dir(k)

    def metrics_path(self, k: int) -> Path:
        return self.row_dir(k) / METRICS

    def state_path(self, k: int) -> Path:
        return self.stage_dir(k) / STATE_FILE

    # --- what is there ------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """A run was started here (its config is saved)."""
        return self.config_path.is_file()

    def has_matrix(self) -> bool:
        """Its perplexity matrix is written (the base row at least has finished)."""
        return self.matrix_path().is_file()

    def base_done(self) -> bool:
        return self.metrics_path(0).is_file()

    def finished_stages(self) -> list[int]:
        """Stages 1..K whose ``metrics.json`` exists (a stage counts as finished once it is written)."""
        out, k = [], 1
        while self.metrics_path(k).is_file():
            out.append(k)
            k += 1
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Row 0 (base) and the rows of the finished stages, in order (each row's whole ``metrics.json``)."""
        rows = [read_json(self.metrics_path(0))] if self.base_done() else []
        return rows + [read_json(self.metrics_path(k)) for k in self.finished_stages()]

    def config(self):
        """The saved config (OmegaConf), or None where no run was started here."""
        return load_saved_config(self.config_path) if self.holds_run() else None

    def info(self) -> dict[str, Any]:
        """``run_info.json`` ({} before a run wrote one)."""
        return read_json(self.info_path) if self.info_path.is_file() else {}

    def prepare(self, cfg) -> None:
        """Check this directory against the config: new, or resumable with the same config; and that it can be
        written (a file in its place, or an existing ancestor that is a file or read-only, is one line)."""
        run_dir = self.path
        if run_dir.exists() and not run_dir.is_dir():
            raise GainError(f"run directory {run_dir} is a file, not a directory (choose another run_dir/run_name)")
        check_creatable(run_dir, f"run directory {run_dir}", " (choose another run_dir or output_root)")
        saved = self.config_path
        if saved.is_file():
            if not cfg.resume:
                raise GainError(f"run directory {run_dir} already holds a run; pass resume=true to continue it "
                                "or choose another run_dir/run_name")
            old = OmegaConf.load(saved)
            if config_hash(old) != config_hash(cfg):
                diff = config_differences(old, cfg)
                more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
                raise GainError(f"resume=true but the config differs from the one saved in {saved}: "
                                f"{'; '.join(diff[:3])}{more}; use the same overrides or a new run_dir")
        elif cfg.resume and cfg.run_dir:
            raise GainError(f"resume=true but {run_dir} holds no run (no config.yaml)")

    def check_same_processes(self, cfg, num_processes: int) -> None:
        """A resumed run keeps its number of processes (the global batch depends on it)."""
        if cfg.resume and self.info_path.is_file():
            before = int(read_json(self.info_path).get("num_processes", 1))
            if before != num_processes:
                raise GainError(f"run {self.path} was started with {before} process(es) and is resumed with "
                                f"{num_processes}; resume it with the same number (one step's batch is batch_size × "
                                "grad_accum × processes)")

    # --- reopening ----------------------------------------------------------------------------
    def require_run(self):
        """The saved config (OmegaConf) of a run directory; one line when ``path`` is not one."""
        if self.path.is_file():
            raise GainError(f"{self.path} is a file, not a run directory")
        if not self.holds_run():
            raise GainError(f"{self.path} is not a gain run directory (no {CONFIG})")
        return load_saved_config(self.config_path)

    def require_finished(self, what: str):
        """(saved config, finished stages, number of stages) of a run with a finished stage, for the commands that
        read one (``gain merge``, ``gain export``; ``what`` names the action in the message)."""
        cfg = self.require_run()
        done = self.finished_stages()
        if not done:
            raise GainError(f"{self.path} has no finished stage to {what}")
        return cfg, done, len(cfg.domains.sequence)

    def check_stage(self, k: int, total: int, done: list[int], base: bool = False) -> None:
        """One line unless stage ``k`` (stages 1..``total``; 0 too with ``base``) is finished (``done``)."""
        finished = ", ".join(map(str, done)) or "none"
        if not (0 if base else 1) <= k <= total:
            raise GainError(f"--stage {k}: stages are numbered 1..{total} ({'0: the base model; ' if base else ''}"
                            f"finished: {finished})")
        if k and k not in done:
            raise GainError(f"stage {k} of {self.path} is not finished (finished: {finished})")

    def is_drift(self) -> bool:
        """The run trains with ``train.domain_schedule=drift`` (each saved state is the whole run up to its segment,
        on the pretrained model)."""
        from gain_cli.training.drift import is_drift  # it imports torch, which reading a run's results does not need

        cfg = self.config()
        return cfg is not None and is_drift(cfg)

    # --- the saved stages ---------------------------------------------------------------------
    def load_state(self, k: int, device="cpu") -> dict[str, torch.Tensor]:
        """Stage k's saved method state (full tensors)."""
        import torch
        from safetensors.torch import load_file

        path = self.state_path(k)
        if not path.is_file():
            raise GainError(f"stage {k} has no saved state ({path} is missing)")
        device = torch.device(device)
        # safetensors names devices its own way: "cpu" (it refuses the "cpu:0" Accelerate gives each process of a
        # multi-CPU run) or "cuda:N"
        return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))

    def apply_stage(self, model, method, k: int, device="cpu"):
        """Apply stage k's saved state: attach, load, carry forward (merge)."""
        state = self.load_state(k, device)
        model = method.attach(model)
        method.load_state_dict(model, state)
        return method.finish_stage(model).eval()

    def apply_saved_stages(self, model, method, upto: int, device="cpu"):
        """Rebuild the model after stage ``upto`` from the base model and the saved stage states."""
        for k in saved_stages_to_apply(method, upto, cumulative=self.is_drift()):
            model = self.apply_stage(model, method, k, device)
        return model.eval()

    def model_after(self, cfg, k: int):
        """(model after stage ``k`` with the run's method applied, tokenizer, method): the base model for k = 0."""
        from omegaconf import OmegaConf

        from gain_cli.methods import build_method  # (torch, transformers, PEFT: not for reading results)
        from gain_cli.models.loading import load_model, model_spec

        model, tokenizer = load_model(cfg.model, cfg.cache_dir)
        method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
        return self.apply_saved_stages(model, method, k), tokenizer, method

    # --- the lock -----------------------------------------------------------------------------
    @contextmanager
    def lock(self, share=None, is_main: bool = True):
        """Refuse a second run on this directory (unless the first one is dead). ``share(fn)`` runs ``fn`` on the
        main process and raises its refusal on every process (several processes: one lock, the main one's)."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
        lock = self.lock_path

        def acquire() -> None:
            if lock.exists():
                try:
                    other = json.loads(lock.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and other.get("pid") and other["pid"] != me["pid"] \
                        and _pid_alive(int(other["pid"])):
                    raise GainError(f"run directory {self.path} is in use by process {other['pid']} on {other['host']} "
                                    f"(since {other.get('started')}); wait for it or choose another run_dir")
                if other.get("host") not in (None, me["host"]):
                    raise GainError(f"run directory {self.path} is locked by {other.get('host')} (pid "
                                    f"{other.get('pid')}); if that run is dead, delete {lock}")
            atomic_write_json(lock, me)

        (share or (lambda fn: fn()))(acquire)
        try:
            yield
        finally:
            if is_main:
                lock.unlink(missing_ok=True)


def resolve_run_dir(cfg) -> Path:
    """The run directory a config names: ``run_dir``, else ``<output_root>/<recipe>/<method>/<run_name or a
    timestamp>`` (with ``resume=true`` and no name: the latest run there)."""
    if cfg.run_dir:
        return Path(os.path.expanduser(str(cfg.run_dir))).resolve()
    parent = Path(str(cfg.output_root)) / str(cfg.recipe or "custom") / str(cfg.method.name)
    if cfg.run_name:
        return (parent / str(cfg.run_name)).resolve()  # a plain name (config._check_choices)
    if cfg.resume:
        runs = sorted((p for p in parent.glob("*") if RunDir(p).info_path.is_file()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise GainError(f"resume=true but there is no earlier run under {parent} (give run_dir=PATH)")
        return runs[-1].resolve()
    return (parent / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


def saved_stages_to_apply(method, upto: int, cumulative: bool = False) -> list[int]:
    """The saved stages that rebuild the model after stage ``upto``: all of them, or only the last one for a method
    whose saved state is cumulative (it holds every stage so far), as every state of a drift run is
    (``cumulative``: the whole state of the one run at step upto·S, on the pretrained model)."""
    ks = list(range(1, upto + 1))
    return ks[-1:] if cumulative or method.cumulative_state else ks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
