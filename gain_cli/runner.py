"""The sequential-domain experiment: base evaluation, then train → save → carry → evaluate per stage.

Orchestration only: the run directory, its layout, lock and checks are ``gain_cli.rundir``; what a run records
about where it ran, ``gain_cli.provenance``; sharing one process's answer with all, ``training.accelerator``.
Every file is written atomically. A stage counts as finished once its metrics.json exists; with
``resume=true`` the finished stages are rebuilt from their saved states (no retraining) and the
run continues after the last one. Stage K's data order and initialisation depend only on
(seed, K), so a resumed run gives the same matrices as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gain_cli import faults, interrupts, provenance
from gain_cli.architectures import num_layers
from gain_cli.config import config_hash, to_yaml
from gain_cli.data.domains import DomainData, ensure_domains
from gain_cli.errors import GainError
from gain_cli.evaluation.harness import LM_EVAL_DIR, run_harness
from gain_cli.evaluation.perplexity import evaluate_blocks, forward_tokens_per_s
from gain_cli.io import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from gain_cli.methods import build_method
from gain_cli.methods.base import StageContext
from gain_cli.models.compiling import CompileDecision, decide_compile
from gain_cli.models.flops import ForwardCounter, flops_per_token, matmul_shapes
from gain_cli.models.loading import load_model, model_spec
from gain_cli.progress import Phase, RunClock
from gain_cli.reporting.matrices import (
    HARNESS_METRICS,
    harness_matrix_name,
    row_stage,
    stage_label,
    write_matrix,
)
from gain_cli.reporting.timing import RunTiming
from gain_cli.rundir import STATE_FILE, TRAIN_FILE, RunDir, resolve_run_dir, saved_stages_to_apply
from gain_cli.threads import threads_for_run, threads_for_stage
from gain_cli.training.accelerator import make_accelerator, on_main_shared
from gain_cli.training.checkpoint import StageCheckpoints
from gain_cli.training.drift import (
    CHECKPOINT_DIR,
    SHARDING_REFUSAL,
    DriftTrainer,
    is_drift,
)
from gain_cli.training.loop import train_stage
from gain_cli.training.sharding import (
    hf_model,
    local_parameter_bytes,
    shard_model,
    sharding_mode,
)
from gain_cli.training.trackers import Trackers
from gain_cli.training.zero3 import make_engine

# --- run directory ---------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- results ---------------------------------------------------------------------------------

def write_matrices(run_dir: Path, domains: list[str]) -> None:
    rows = RunDir(run_dir).rows()
    if not rows:
        return
    labels = [r["row"] for r in rows]
    write_matrix(run_dir, "ppl_matrix", "ppl", domains, labels, [[r["ppl"][d] for d in domains] for r in rows])
    tasks = list(rows[0].get("harness", {}) or {})
    if not tasks:
        return

    for metric in HARNESS_METRICS:  # acc always; acc_stderr, acc_norm, acc_norm_stderr where a task reports them
        if metric == "acc" or any(metric in ((r.get("harness") or {}).get(t) or {}) for r in rows for t in tasks):
            write_matrix(run_dir, harness_matrix_name(metric), metric, tasks, labels,
                         [[(r.get("harness") or {}).get(t, {}).get(metric, float("nan")) for t in tasks] for r in rows])


COMPILE_KEYS = {"train": "train.compile", "eval": "eval.compile"}


def _initial_compile(cfg: DictConfig, device) -> dict[str, Any]:
    """train.compile / eval.compile before the work ahead is known: ``true`` checked now (a machine that cannot build
    compiled kernels says so before any work), ``false`` and ``auto`` eager until ``Experiment.plan_compile``."""
    out = {}
    for kind, key in COMPILE_KEYS.items():
        setting = OmegaConf.select(cfg, key)
        out[kind] = (decide_compile(setting, key, None, 1, device) if setting != "auto"
                     else CompileDecision(False, "auto: not decided yet"))
    return out


# --- the experiment --------------------------------------------------------------------------

class Experiment:
    """Holds what every stage shares: config, accelerator, tokenizer, data, method."""

    def __init__(self, cfg: DictConfig, run_dir: Path, console=None, accelerator=None):
        self.cfg, self.run_dir, self.console = cfg, run_dir, console
        self.rd = RunDir(run_dir)  # its layout
        self.drift = is_drift(cfg)  # train.domain_schedule=drift: one continuous run (gain_cli.training.drift)
        self.drift_trainer = None  # its trainer, made when its first segment is needed
        self.accelerator = accelerator if accelerator is not None else make_accelerator(cfg)
        self.compile = _initial_compile(cfg, self.accelerator.device)  # decided for the work ahead: plan_compile

        threads, why = threads_for_run(cfg.train.threads)  # train.threads, else the CLI's start-up choice
        if threads:
            torch.set_num_threads(threads)
            self.say(why)
        # caches (pretrained tiny model, converted checkpoints, built data, token streams) are filled
        # once per machine by its first process; the others then read them
        with self.accelerator.local_main_process_first():
            self.model, self.tokenizer = load_model(cfg.model, cfg.cache_dir)
            self.spec = model_spec(cfg.model, self.model.config.model_type)
            self.method = build_method(cfg.method, self.spec)
            self.method.check_model(self.model)
            domains = ensure_domains(cfg.domains, cfg.cache_dir, log=self.say)
            self.domains = [d.name for d in domains]
            self.data = DomainData(domains, self.tokenizer, cfg.cache_dir)
            self.sharding = sharding_mode(cfg, self.accelerator.num_processes, self.method)
            if self.drift and self.sharding != "none":  # train.sharding=auto chose sharding: refused before the run

                raise GainError(f"{SHARDING_REFUSAL} (train.sharding={cfg.train.get('sharding')} → {self.sharding})")
            if not self.sharded:  # sharded: fully_shard moves each process's shards to its device
                self.model.to(self.accelerator.device)
            self.eval_blocks = {d: self.data.blocks(d, "validation", int(cfg.eval.block_size), cfg.eval.max_blocks)
                                for d in self.domains}
            for d in self.domains:  # every training split read now: a bad file is refused before the run starts
                self.data.blocks(d, "train", int(cfg.train.seq_len))
        self.param_bytes_per_process = None
        self.trackers = None  # train.log_with (gain_cli.training.trackers), opened by run_experiment
        self.clock = RunClock(int(cfg.train.steps))  # what each phase cost so far: the time left
        self.timing = None  # RunTiming: seconds, tokens and FLOPs per phase (timing.json), set by run_experiment
        self.train_flops_per_token = 0.0  # of the model with the method attached (gain_cli.models.flops)
        self.rows: tuple[int, int] | None = None  # (rows done, rows in all), kept by _run_rows
        self.harness_on = bool(cfg.eval.harness and cfg.eval.harness.enabled)
        self.engine = None  # train.sharding=zero3: the run's DeepSpeed engine
        if self.sharded:  # outside local_main_process_first: sharding is a collective of all processes
            self._shard()

    def plan_compile(self, stages_left: int, rows_left: int) -> None:
        """Decide ``auto`` compiling for the rest of the run from the work ahead, measured by ``estimate_runtime`` on
        the main process (``clock.guess``), the same on every process; log every decision."""
        cfg, device = self.cfg, self.accelerator.device
        layers = num_layers(hf_model(self.model).config, self.spec)  # the config: a PEFT or FSDP wrapper hides module paths
        refused = {"train": "train.sharding=zero3 trains eager (DeepSpeed's hooks)" if self.sharding == "zero3" else None,
                   "eval": "sharded evaluation runs eager" if self.sharded else None}

        def decide() -> dict[str, Any]:
            step, sweep = self.clock.guess.get("step"), self.clock.guess.get("perplexity")
            work = {"train": stages_left * int(cfg.train.steps) * step if step else None,
                    "eval": rows_left * sweep if sweep else None}
            return {kind: decide_compile(OmegaConf.select(cfg, key), key, work[kind], layers, device,
                                         refused[kind]) for kind, key in COMPILE_KEYS.items()}

        self.compile = on_main_shared(self.accelerator, decide)
        for kind, key in COMPILE_KEYS.items():
            self.say(self.compile[kind].line(key))

    def record(self, phase: str, seconds: float, tokens: int = 0, flops: float = 0.0, steps: int | None = None) -> None:
        """A finished phase: for the time left (RunClock) and for timing.json."""
        self.clock.record(phase, seconds, steps)
        if self.timing is not None:
            self.timing.add(phase, seconds, tokens, flops)

    def write_timing(self, status: str = "complete") -> None:
        if self.timing is not None:
            from collections import Counter

            shapes = Counter((i, o) for i, o, _ in matmul_shapes(self.model))  # for the matmul peak (gain bench --runs)
            self.timing.write(self.run_dir, status=status, threads=torch.get_num_threads(),
                              compile={k: d.line(COMPILE_KEYS[k]) for k, d in self.compile.items()},
                              model=str(self.cfg.model.name), matmul_shapes=[[i, o, k] for (i, o), k in sorted(shapes.items())],
                              step_tokens=int(self.cfg.train.batch_size) * int(self.cfg.train.seq_len))

    def recheck_threads(self) -> None:
        """At a stage's start: the thread count follows the machine's load (gain_cli.threads) unless the user or a
        launcher fixed it."""
        change = None if self.cfg.train.threads else threads_for_stage(torch.get_num_threads())
        if change is not None:
            torch.set_num_threads(change[0])
            self.say(change[1])

    @property
    def train_cfg(self) -> DictConfig:
        """``cfg.train`` with ``compile`` as decided (a bool: the training loops read it)."""
        out = OmegaConf.create(OmegaConf.to_container(self.cfg.train, resolve=True))
        out.compile = self.compile["train"].enabled
        return out

    @property
    def sharded(self) -> bool:
        return self.sharding != "none"

    def _shard(self) -> None:
        """Attach the method once (its identity: gains of one, LoRA B = 0) and shard the model per decoder layer;
        each stage then reopens the method in place (gain_cli.training.sharding)."""
        acc = self.accelerator
        self.method.check_shardable()
        self.model = self.method.attach(self.model)
        if self.sharding == "zero3":  # one engine for the run; its optimiser holds the trainable parameters

            self.engine = make_engine(self.model, self.method, self.cfg.train, acc.device.type, acc.num_processes)
            how, detail = "DeepSpeed ZeRO-3", "every parameter partitioned"
        for p in self.model.parameters():  # trainable only while a stage is open
            p.requires_grad_(False)
        if self.sharding == "fsdp":
            shard_model(self.model, self.spec, acc.device.type, acc.num_processes)
            how, detail = "FSDP2", f"per decoder layer, {acc.device.type} device mesh"
        self.model.eval()
        mine = torch.tensor(float(local_parameter_bytes(self.model)), device=acc.device)
        self.param_bytes_per_process = int(acc.reduce(mine, "max").item())
        self.say(f"sharded training: {how} over {acc.num_processes} processes ({detail}); "
                 f"{self.param_bytes_per_process:,} bytes of parameters per process")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, msg: str) -> None:
        if self.console is not None and self.accelerator.is_main_process:
            self.console.print(msg)

    # -- evaluation --
    def row_title(self, row: str) -> str:
        """``row 0 (base model)`` or ``stage K/T <domain>`` (progress lines)."""
        k = row_stage(row)
        return "row 0 (base model)" if k == 0 else f"stage {k}/{len(self.domains)} {self.domains[k - 1]}"

    def phase(self, row: str, what: str, total: int | None = None, unit: str = "", **fields) -> Phase:
        """One phase of a row (train, perplexity, lm-eval) under the run's own bar (rows done, time left)."""
        overall = None
        if self.rows is not None:
            done, rows_total = self.rows
            overall = (f"run · {self.clock.eta(done, rows_total, len(self.domains) - max(done - 1, 0), self.harness_on)}",
                       done, rows_total)
        return Phase(self.console if self.is_main else None, f"{self.row_title(row)} · {what}", total, unit,
                     overall, **fields)

    def evaluate(self, row: str, model=None) -> dict[str, Any]:
        model = model if model is not None else self.model
        # block_nll: the NLL sum of each validation block (eval_tokens / blocks predicted tokens each), kept for
        # the confidence intervals of every perplexity and metric (gain_cli.reporting.uncertainty)
        out: dict[str, Any] = {"row": row, "ppl": {}, "loss": {}, "eval_tokens": {}, "block_nll": {}}
        with self.phase(row, "perplexity", len(self.domains), "domains") as ph:
            for d in self.domains:
                faults.point(f"eval.{row.split(':')[0]}.{d}")
                r = evaluate_blocks(model, self.eval_blocks[d], int(self.cfg.eval.batch_size), self.accelerator,
                                    compile=self.compile["eval"].enabled)
                out["ppl"][d], out["loss"][d], out["eval_tokens"][d] = r.ppl, r.loss, r.tokens
                out["block_nll"][d] = r.block_nll
                ph.update(advance=1)
        out["eval_seconds"] = round(ph.seconds, 3)

        positions = sum(int(b.numel()) for b in self.eval_blocks.values())
        self.record("perplexity", ph.seconds, positions,
                    positions * flops_per_token(model, int(self.cfg.eval.block_size), training=False)["total"])
        harness_cfg = self.cfg.eval.harness
        if harness_cfg is not None and harness_cfg.enabled:
            tasks = ", ".join(str(t) for t in harness_cfg.tasks or [])

            with self.phase(row, f"lm-eval ({tasks})") as ph, ForwardCounter(model) as counted:
                out["harness"] = self._harness(model, harness_cfg, row)
            out["harness_seconds"] = round(ph.seconds, 3)
            self.record("lm-eval", ph.seconds, counted.tokens, counted.flops)
        return out

    def _harness(self, model, harness_cfg, row: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.is_main or self.sharded:
            # sharded: every forward needs every process, so all of them run the same items in the same batches
            # (each in its own work folder); the main process's result is the one kept
            work = self.run_dir / "harness_work"
            if not self.is_main:
                work = work / f"process_{self.accelerator.process_index}"
            keep = self.row_dir(row) / LM_EVAL_DIR if self.is_main else None  # lm-eval's own results files
            result = run_harness(model, self.tokenizer, OmegaConf.to_container(harness_cfg, resolve=True), work, keep)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [result]
            broadcast_object_list(box, from_process=0)
            result = box[0]
        return result

    def row_dir(self, row: str) -> Path:
        """Where a row's files go: ``base/`` for row 0, ``stages/stage_K/`` for ``stage_K:<domain>``."""
        return self.rd.row_dir(row_stage(row))

    # -- stages --
    def stage_dir(self, k: int) -> Path:
        return self.rd.stage_dir(k)

    def rebuild(self, upto: int) -> None:
        """Re-apply the saved states of stages 1..upto to the base model (no training)."""
        if self.drift:  # the one run continues from its checkpoint when the next segment needs it (_drift)
            return
        if not self.sharded:
            self.model = self.rd.apply_saved_stages(self.model, self.method, upto, self.accelerator.device)
            return
        for k in saved_stages_to_apply(self.method, upto):
            self.apply_trained_stage(k)

    def train_stage(self, k: int, domain: str, progress_cb: Callable | None = None) -> dict[str, Any]:
        if self.drift:
            return self.train_segment(k, domain, progress_cb)
        cfg = self.cfg
        seed_everything(int(cfg.seed) * 1000 + k)  # adapter init / dropout of stage k depend only on (seed, k)

        if self.sharded:
            self.method.open_sharded_stage(self.model)
        else:
            self.model = self.method.attach(self.model)
        n_trainable = self.method.count_trainable(self.model)

        self.train_flops_per_token = flops_per_token(self.model, int(cfg.train.seq_len), training=True)["total"]
        ctx = StageContext(stage=k, domain=domain, earlier=self.domains[: k - 1], data=self.data,
                           train_cfg=cfg.train, seed=int(cfg.seed), accelerator=self.accelerator)
        blocks = self.method.stage_blocks(ctx)

        ckpts = StageCheckpoints(self.stage_dir(k), cfg.train.checkpoint_every, self.is_main)
        resumed_from = ckpts.saved_step()
        if resumed_from is not None:  # the log continues from the checkpoint: steps logged after it are dropped
            self.say(f"resumed stage {k} from step {resumed_from}")
            self.drop_logged_after(lambda rec: rec.get("stage") == k and int(rec.get("step", 0) or 0) > resumed_from)
        stats = train_stage(self.model, self.method, blocks, self.train_cfg, seed=int(cfg.seed), stage=k,
                            accelerator=self.accelerator, progress=progress_cb, log=self.log_train, checkpoints=ckpts,
                            engine=self.engine)
        self.method.after_training(self.model, ctx)
        info = {"domain": domain, "trainable_params": n_trainable, "train": stats.to_dict(),
                "method_info": self.method.stage_info()}
        # sharded: gathered on every process (a collective); only the main process writes
        state = self.method.state_dict(self.model) if self.is_main or self.sharded else None
        if self.is_main:
            atomic_write_json(self.stage_dir(k) / TRAIN_FILE, info)
            atomic_save_safetensors(self.stage_dir(k) / STATE_FILE, state,
                                    metadata={"method": self.method.name, "stage": str(k), "domain": domain})
            ckpts.clear()
        del state
        self.accelerator.wait_for_everyone()
        if self.sharded:
            self.method.close_sharded_stage(self.model)
        else:
            self.model = self.method.finish_stage(self.model)
        self.model.eval()
        return info

    # -- the training log (train_log.jsonl), staged and drift runs alike --
    @property
    def train_log(self) -> Path:
        return self.rd.train_log_path

    def log_train(self, rec: dict) -> None:
        """One training record: appended to the log (main process) and handed to the trackers."""
        if self.is_main:
            with open(self.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        self.trackers.train_step(rec)

    def drop_logged_after(self, later: Callable[[dict], bool]) -> None:
        """Remove the log's records for which ``later(record)`` holds: the steps a resumed run trains (and logs)
        again after its checkpoint. Lines that are not JSON are kept."""
        if not (self.is_main and self.train_log.is_file()):
            return
        keep = [line for line in self.train_log.read_text(encoding="utf-8").splitlines()
                if line.strip() and not _parses_to(line, later)]
        atomic_write_text(self.train_log, "".join(f"{line}\n" for line in keep))

    def trained_stage_info(self, k: int) -> dict[str, Any] | None:
        """What training stage k reported, when it was trained and saved but its evaluation never finished (a run
        stopped during the sweep); None when the stage still has to be trained."""
        d = self.stage_dir(k)
        if (d / TRAIN_FILE).is_file() and (d / STATE_FILE).is_file():
            return read_json(d / TRAIN_FILE)
        return None

    # -- train.domain_schedule=drift: one continuous run, segment k ending where stage k would --
    def _drift(self, k: int, trained: bool = False):
        """The drift run's trainer, made once: the method attached once to the pretrained model, one optimiser and
        schedule, continued from the run's checkpoint when there is one. ``trained``: segment k was trained and
        saved before the run stopped (the checkpoint must be at its end)."""
        if self.drift_trainer is None:
            cfg = self.cfg
            seed_everything(int(cfg.seed) * 1000 + 1)  # the method's init: as a staged run's stage 1
            self.model = self.method.attach(self.model)

            self.train_flops_per_token = flops_per_token(self.model, int(cfg.train.seq_len), training=True)["total"]
            blocks = [self.data.blocks(d, "train", int(cfg.train.seq_len)) for d in self.domains]
            tr = DriftTrainer(self.model, self.method, blocks, self.domains, self.train_cfg, seed=int(cfg.seed),
                              accelerator=self.accelerator)
            at = tr.restore(self._drift_checkpoints())
            if at is not None:
                self.say(f"drift run resumed from its checkpoint at step {at} of {tr.total}")
            # steps logged after the checkpoint are trained (and logged) again
            self.drop_logged_after(lambda rec: int(rec.get("global_step", 0) or 0) > (at or 0))
            self.drift_trainer = tr
        tr = self.drift_trainer
        if trained and tr.step != k * tr.steps:
            raise GainError(f"drift run {self.run_dir}: segment {k} was saved but the run's checkpoint is at step "
                            f"{tr.step}, not {k * tr.steps} ({CHECKPOINT_DIR}/ is missing or stale); "
                            "start a new run_dir")
        return tr

    def _drift_checkpoints(self):
        return StageCheckpoints(self.run_dir / CHECKPOINT_DIR, self.cfg.train.checkpoint_every, self.is_main)

    def train_segment(self, k: int, domain: str, progress_cb: Callable | None = None) -> dict[str, Any]:
        """Segment k of a drift run: train on, save the method's whole state at step k·S (no merge, nothing reset)."""
        tr = self._drift(k)
        stats = tr.train_segment(k, progress=progress_cb, log=self.log_train, checkpoints=self._drift_checkpoints())
        info = {"domain": domain, "trainable_params": self.method.count_trainable(self.model), "train": stats.to_dict(),
                "method_info": self.method.stage_info(), "drift": tr.segment_info(k)}
        state = self.method.state_dict(self.model) if self.is_main else None
        if self.is_main:
            atomic_write_json(self.stage_dir(k) / TRAIN_FILE, info)
            atomic_save_safetensors(self.stage_dir(k) / STATE_FILE, state,
                                    metadata={"method": self.method.name, "stage": str(k), "domain": domain,
                                              "domain_schedule": "drift"})
        del state
        self.accelerator.wait_for_everyone()
        self.model.eval()
        return info

    def finish_drift(self) -> None:
        """Every segment evaluated: the run's trainer checkpoint is not needed any more."""
        import shutil

        if self.drift and self.is_main:
            shutil.rmtree(self.run_dir / CHECKPOINT_DIR, ignore_errors=True)

    def apply_trained_stage(self, k: int) -> None:
        """Carry the model forward through stage k from its saved state instead of training it again."""
        if self.drift:  # the run's checkpoint at the end of segment k holds the model (and what training needs)
            self._drift(k, trained=True)
            return
        if not self.sharded:
            self.model = self.rd.apply_stage(self.model, self.method, k, self.accelerator.device)
            return
        self.method.open_sharded_stage(self.model)  # the same calls as a stage, with the saved state for training
        self.method.load_state_dict(self.model, self.rd.load_state(k, self.accelerator.device))
        self.method.close_sharded_stage(self.model)
        self.model.eval()


def _parses_to(line: str, test: Callable[[dict], bool]) -> bool:
    """``test`` of a log line's JSON record (False for a line that is not JSON)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return bool(test(rec))


def run_experiment(cfg: DictConfig, console=None, on_event: Callable[[str, dict], None] | None = None) -> Path:
    """Run (or resume) the experiment described by cfg; return the run directory."""
    timing = RunTiming()  # the wall time of this session starts here: loading and converting are part of it
    acc = make_accelerator(cfg)

    def run_info(cfg, acc, status, started=None, exp=None):
        return provenance.run_info(cfg, acc.num_processes, status, started, exp.sharding if exp else "none",
                                   exp.param_bytes_per_process if exp else None)

    def choose_run_dir() -> Path:
        rd = resolve_run_dir(cfg)
        RunDir(rd).prepare(cfg)
        RunDir(rd).check_same_processes(cfg, acc.num_processes)
        return rd

    run_dir = on_main_shared(acc, choose_run_dir)  # one directory for all processes (the default is a timestamp)
    exp = Experiment(cfg, run_dir, console, accelerator=acc)
    exp.timing = timing
    # the directory appears only now that the run can start: a model, tokenizer or data file that cannot be read
    # was refused while the experiment loaded them, and left nothing behind
    on_main_shared(acc, lambda: run_dir.mkdir(parents=True, exist_ok=True))
    emit = on_event or (lambda *_: None)
    rd = exp.rd
    with rd.lock(lambda fn: on_main_shared(acc, fn), acc.is_main_process):
        if exp.is_main:  # temp files of a killed writer: never read, removed under the lock
            for stale in run_dir.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        started = rd.info().get("started") or datetime.now().isoformat(timespec="seconds")  # kept by every write
        if exp.is_main:
            atomic_write_text(rd.config_path, to_yaml(cfg))
            atomic_write_json(rd.info_path, run_info(cfg, acc, "running", started, exp))

        exp.trackers = Trackers(acc, cfg, run_dir)
        try:
            _run_rows(exp, cfg, console, emit)
        except BaseException as e:  # the run stops here: run_info.json says so (a SIGKILL leaves "running")
            if exp.is_main:
                status = "interrupted" if interrupts.received(e) else "failed"
                info = {**run_info(cfg, acc, status, started, exp), **({"error": str(e)} if status == "failed" else {})}
                atomic_write_json(rd.info_path, info)
                exp.write_timing(status)
            raise
        finally:
            exp.trackers.close()
        if exp.is_main:
            atomic_write_json(rd.info_path, run_info(cfg, acc, "complete", started, exp))
            _write_run_report(run_dir, exp)
            exp.write_timing()
    return run_dir


def _run_rows(exp: Experiment, cfg: DictConfig, console, emit: Callable) -> None:
    """Every row of the matrices not written yet: the base model's, then each stage's (train, evaluate)."""
    run_dir, acc = exp.run_dir, exp.accelerator
    # decided by the main process (other machines may not see the run directory)
    done, base_done = on_main_shared(acc, lambda: (exp.rd.finished_stages(), exp.rd.base_done()))
    if (exp.is_main or exp.sharded) and len(done) < len(exp.domains):  # sharded: its forwards need every process
        exp.say(estimate_runtime(exp, len(exp.domains) - len(done), base_missing=not base_done))
    exp.plan_compile(len(exp.domains) - len(done), len(exp.domains) - len(done) + int(not base_done))
    exp.rows = (len(done) + int(base_done), len(exp.domains) + 1)

    def row_finished() -> None:
        rows_done, rows_total = exp.rows[0] + 1, exp.rows[1]
        exp.rows = (rows_done, rows_total)
        exp.say(exp.clock.line(rows_done, rows_total, len(exp.domains) - (rows_done - 1), exp.harness_on))

    if done:
        exp.say(f"resuming {run_dir}: segments 1..{done[-1]} of the drift run finished, continuing it from its "
                "checkpoint" if exp.drift else
                f"resuming {run_dir}: stages 1..{done[-1]} finished, rebuilding them from their saved states")
        exp.rebuild(done[-1])
    if not base_done:
        row = on_main_shared(acc, lambda: shared_base_row(cfg))
        if row is not None:
            exp.say(f"row 0 (base model) taken from {cfg.base_row}: the same model, domains and evaluation")
        else:
            exp.say("evaluating the base model on every domain (row 0)")
            row = {**exp.evaluate("base"), "base_key": base_row_key(cfg)}
        if exp.is_main:
            atomic_write_json(exp.rd.metrics_path(0), row)
            write_matrices(run_dir, exp.domains)
        exp.trackers.row(0, row)
        row_finished()
        emit("row", row)
    acc.wait_for_everyone()
    for k, domain in enumerate(exp.domains, 1):
        if k in done:
            continue
        info = on_main_shared(acc, lambda: exp.trained_stage_info(k))
        if info is not None:  # trained and saved before the run stopped: only its evaluation is missing
            exp.say(f"stage {k}/{len(exp.domains)} {domain}: trained before the run stopped, applying its saved state")
            exp.apply_trained_stage(k)
        else:
            exp.recheck_threads()
            with exp.phase(stage_label(k, domain), "train", int(cfg.train.steps), "steps", loss="-",
                           **{"tok/s": "-"}) as prog:
                info = exp.train_stage(k, domain, lambda step, total, loss, tps: prog.update(
                    step, loss=f"{loss:.3f}", **{"tok/s": f"{tps:,.0f}"}))
            seconds = float(info["train"]["seconds"])
            tokens = round(float(info["train"]["tokens_per_s"]) * seconds)  # trained in this session
            exp.record("train", seconds, tokens, tokens * exp.train_flops_per_token, steps=int(info["train"]["steps"]))
        row = exp.evaluate(stage_label(k, domain))
        metrics = {**info, **row}
        if exp.is_main:
            atomic_write_json(exp.rd.metrics_path(k), metrics)
            write_matrices(run_dir, exp.domains)
            exp.say(f"stage {k}/{len(exp.domains)} {domain}: own-domain PPL {row['ppl'][domain]:.3f}, "
                    f"loss {info['train']['first_loss']:.3f} → {info['train']['final_loss']:.3f}, "
                    f"{info['train']['tokens_per_s']:.0f} tok/s")
        exp.trackers.row(k, row, domain)
        row_finished()
        emit("row", metrics)
        acc.wait_for_everyone()
    exp.finish_drift()


def base_row_key(cfg: DictConfig) -> str:
    """What row 0 depends on: the model, the domains and the evaluation settings (not the method or the seed)."""
    return config_hash(OmegaConf.create({k: cfg[k] for k in ("model", "domains", "eval")}))


def shared_base_row(cfg: DictConfig) -> dict[str, Any] | None:
    """Row 0 from ``cfg.base_row`` (another run's ``base/metrics.json`` or run directory) when it was computed for
    the same model, domains and evaluation (its ``base_key``); None when unset or missing. A file computed for other
    settings is an error (it would silently give the run a wrong row 0)."""
    src = cfg.base_row
    if not src:
        return None
    path = Path(os.path.expanduser(str(src)))
    if path.is_dir():
        path = RunDir(path).metrics_path(0)
    if not path.is_file():
        return None
    row = read_json(path)
    if row.get("base_key") != base_row_key(cfg):
        raise GainError(f"base_row={src}: that row 0 was computed for another model, domain set or evaluation "
                        "config; remove base_row to evaluate the base model in this run")
    return row


def estimate_runtime(exp: Experiment, stages_left: int, base_missing: bool) -> str:
    """A rough time estimate from one measured forward pass (printed before the work starts)."""
    cfg = exp.cfg
    blocks = next(iter(exp.eval_blocks.values()))[: int(cfg.eval.batch_size)].to(exp.accelerator.device)

    fwd_tps = forward_tokens_per_s(exp.model, blocks)
    eval_tokens = sum(b.numel() for b in exp.eval_blocks.values())
    sweeps = stages_left + (1 if base_missing else 0)
    step_tokens = int(cfg.train.batch_size) * int(cfg.train.grad_accum) * int(cfg.train.seq_len)
    train_tokens = stages_left * int(cfg.train.steps) * step_tokens
    seconds = sweeps * eval_tokens / fwd_tps + train_tokens * 3.0 / fwd_tps
    exp.clock.guess = {"step": step_tokens * 3.0 / fwd_tps, "perplexity": eval_tokens / fwd_tps}  # until measured
    return (f"estimate: ~{seconds / 60:.1f} min for {stages_left} stage(s) and {sweeps} evaluation sweep(s) "
            f"(forward measured at {fwd_tps:,.0f} tok/s; a training token assumed to cost 3 forward tokens; "
            "lm-eval measured on the first row; the time left is updated after every row)")


def _write_run_report(run_dir: Path, exp: Experiment) -> None:
    try:
        from gain_cli.reporting.report import write_report
    except ImportError:
        return
    # PNG only at the end of every run (about a second less per figure); `gain report RUN --out DIR` writes the
    # same figures as SVG and PDF too, for papers
    write_report([run_dir], run_dir / "report", "md", figure_formats=("png",))
