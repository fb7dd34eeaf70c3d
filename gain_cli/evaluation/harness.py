"""Downstream evaluation through lm-evaluation-harness (BoolQ and any other lm-eval task), on the model in memory.

``run_harness`` runs ``lm_eval.simple_evaluate`` on the calling process with an ``HFLM`` built around the model
object and an explicit tokenizer. BoolQ comes from one of two places:

* a local BoolQ-format JSONL file (``boolq_path``, or the packaged 24-item ``gain_cli/data/boolq_tiny.jsonl`` when
  ``boolq_path: builtin`` or when the hub is offline): a task YAML written into ``work_dir`` from
  ``gain_cli/evaluation/tasks/boolq_local.yaml`` with lm-eval's stock BoolQ prompt, choices and metric;
* lm-eval's stock ``boolq`` task (the SuperGLUE validation split from the hub) when online and no path is given.

Either way the result is reported under the name ``boolq``. A local file is evaluated in yes/no/yes/no order
(``boolq_balanced``, default true: each side in file order, the longer side's rest at the end), so that the first N
items that ``limit`` keeps are balanced (±1) whatever the file's order. ``cloze`` is gain's local LAMBADA-style
last-word task on ``cloze_path`` (gain_cli/evaluation/cloze.py). Other names in ``tasks`` go to lm-eval's default task
index unchanged (building that index costs 5-9 s, once per process; it is local, no download); a path to a task YAML
file is loaded as is, a path to a ``.jsonl`` file is a multiple-choice or log-likelihood task in gain's JSONL
convention (gain_cli/evaluation/jsonl_tasks.py). ``limit`` and ``num_fewshot`` are one value for every task or a
mapping per task; every metric lm-eval reports is kept (acc, acc_norm, their stderrs, ...). See
docs/downstream-tasks.md.

The fast path (end of this module) scores lm-eval's single-token continuations in one pass with lm-eval's own
numbers, the log-softmax in the model's dtype as lm-eval takes it: ``score_multiple_choice`` / ``score_yes_no`` pick
lm-eval's per-item choices, ``harness_results(..., fast=True)`` runs lm-eval with it. Runs use lm-eval's own scoring.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gain_cli.errors import GainError
from gain_cli.evaluation.cloze import cloze_source, write_cloze_task
from gain_cli.evaluation.jsonl_tasks import (
    jsonl_task_name,
    load_task_jsonl,
    write_jsonl_task,
)
from gain_cli.io import read_jsonl_objects
from gain_cli.models.kv_cache import no_kv_cache
from gain_cli.models.loading import hub_offline
from gain_cli.schemas.run import HarnessConfig

log = logging.getLogger(__name__)

BUILTIN_BOOLQ = Path(__file__).resolve().parents[1] / "data" / "boolq_tiny.jsonl"
TASK_TEMPLATES = Path(__file__).resolve().parent / "tasks"
BOOLQ_FIELDS = ("question", "passage", "label")
BOOLQ_CHOICES = ("no", "yes")          # lm-eval's doc_to_choice for boolq; index = label
TARGET_DELIMITER = " "                 # lm-eval's default target_delimiter
BUILTIN_NAMES = ("builtin", "tiny")    # boolq_path values that select the packaged file

# lm-eval messages that are expected every time a model object is passed in; not worth a warning per stage.
_EXPECTED_LMEVAL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "HF model type is neither marked as CausalLM or Seq2SeqLM",
    "from None to",  # "Overwriting default num_fewshot of X from None to N": the task had no default
)


# --------------------------------------------------------------------------------------------- BoolQ data


def _label_value(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "yes", "no", "0", "1"):
        return raw.strip().lower() in ("true", "yes", "1")
    return None


def load_boolq_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a BoolQ-format JSONL file: one object per line with ``question``, ``passage``, ``label``.

    ``label`` may be a bool, 0/1 or "true"/"false"/"yes"/"no"; the original BoolQ release's ``answer`` is accepted
    in its place. Blank lines are skipped. Returns ``{"question", "passage", "label" (bool), "idx"}`` dicts
    (``idx`` from the file when it is an integer, else the item's position). Raises GainError naming the file, line and problem.
    """
    items: list[dict[str, Any]] = []
    for where, obj in read_jsonl_objects(path, "BoolQ file", f"fields {', '.join(BOOLQ_FIELDS)}"):
        if "label" not in obj and "answer" in obj:
            obj["label"] = obj["answer"]
        for field in BOOLQ_FIELDS:
            if field not in obj or obj[field] is None:
                raise GainError(f"{where}: missing field '{field}' (BoolQ lines need {', '.join(BOOLQ_FIELDS)})")
        for field in ("question", "passage"):
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise GainError(f"{where}: field '{field}' must be a non-empty string")
        label = _label_value(obj["label"])
        if label is None:
            raise GainError(f"{where}: field 'label' must be true/false (or 0/1), got {obj['label']!r}")
        idx = obj.get("idx")
        items.append({"question": obj["question"], "passage": obj["passage"], "label": label,
                      "idx": idx if isinstance(idx, int) and not isinstance(idx, bool) else len(items)})
    return items


def boolq_prompt(item: Mapping[str, Any]) -> str:
    """lm-eval's BoolQ context: ``"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``."""
    return f"{item['passage']}\nQuestion: {item['question']}?\nAnswer:"


# --------------------------------------------------------------------------------------------- config


def _one_limit(limit: Any, key: str) -> int | float | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 or (
            isinstance(limit, float) and limit >= 1 and not limit.is_integer()):
        raise GainError(f"{key} must be null, a positive integer or a fraction in (0, 1), got {limit!r}")
    return int(limit) if float(limit) >= 1 else float(limit)


def _one_fewshot(n: Any, key: str) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise GainError(f"{key} must be null or an integer >= 0, got {n!r}")
    return n


def per_task(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``{task: value}`` of a resolved config's ``limit`` or ``num_fewshot`` (one value for all, or a mapping)."""
    value = cfg[key]
    return dict(value) if isinstance(value, Mapping) else {t: value for t in cfg["tasks"]}


def task_label(entry: str) -> str:
    """The name lm-eval reports an ``eval.harness.tasks`` entry under: the entry itself for a task name, the stem of a
    JSONL task file, the ``task:`` of a task YAML (its stem when the file cannot be read or names none)."""
    path = Path(os.path.expanduser(entry))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return path.stem
    if suffix in (".yaml", ".yml"):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return path.stem
        import re

        found = re.search(r"""^task:[ \t]*['"]?([^'"#\s]+)""", text, re.M)
        return found.group(1) if found else path.stem
    return entry


_WARNED_KEYS: set[tuple[str, str]] = set()  # (key, absent names) warned about


def _mapping_per_task(mapping: Mapping[str, Any], tasks: Sequence[str], key: str) -> dict[str, Any]:
    """A per-task mapping keyed by ``eval.harness.tasks`` entries or by the names they report under (a task file's
    task name: ``{tiny_mc2: 3}`` for ``tasks: [data/tiny_mc2.jsonl]``), re-keyed by the entries. Keys that name no
    task of ``tasks`` are left out, with a warning once per process (a recipe's per-task table may name tasks a run
    leaves out: ``eval.harness.tasks=[boolq]`` on the GPU eval config)."""
    lookup = {t: t for t in tasks}
    for t in tasks:
        lookup.setdefault(task_label(t), t)
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        entry = lookup.get(str(k))
        if entry is None:
            continue
        if entry in out:
            raise GainError(f"eval.harness.{key} names the task '{entry}' twice")
        out[entry] = v
    absent = ", ".join(sorted(str(k) for k in mapping if str(k) not in lookup))
    if absent and (key, absent) not in _WARNED_KEYS:
        _WARNED_KEYS.add((key, absent))
        log.warning("eval.harness.%s names %s, not in eval.harness.tasks (%s): left out", key, absent, ", ".join(tasks))
    return out


def resolve_harness_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and values checked (GainError on unknown keys or bad values). A per-task ``limit`` or
    ``num_fewshot`` mapping comes back keyed by every entry of ``tasks`` (limit: null, num_fewshot: 0 where the
    mapping names no value)."""
    out = HarnessConfig.of(cfg).to_dict()  # defaults, types and ranges (gain_cli/schemas/run.py)
    tasks = out["tasks"]
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks is None:
        tasks = []
    tasks = [str(t) for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise GainError(f"eval.harness.tasks lists a task twice: {tasks}")
    out["tasks"] = tasks
    limit = out["limit"]
    if isinstance(limit, Mapping):  # one limit per task: {boolq: 48, cloze: 100}
        limits = _mapping_per_task(limit, tasks, "limit")
        out["limit"] = {t: _one_limit(limits.get(t), f"eval.harness.limit.{t}") for t in tasks}
    else:
        out["limit"] = _one_limit(limit, "eval.harness.limit")
    nf = out["num_fewshot"]
    if isinstance(nf, Mapping):  # shots per task: {boolq: 0, hellaswag: 10}; a task the mapping does not name: 0
        shots = _mapping_per_task(nf, tasks, "num_fewshot")
        out["num_fewshot"] = {t: _one_fewshot(shots.get(t, 0), f"eval.harness.num_fewshot.{t}") for t in tasks}
    else:
        out["num_fewshot"] = _one_fewshot(nf, "eval.harness.num_fewshot")
    return out


def boolq_source(cfg: Mapping[str, Any]) -> Path | None:
    """The local BoolQ file to evaluate on, or None for lm-eval's stock (hub) task."""
    path = HarnessConfig.of(cfg).boolq_path
    if path is not None and str(path).strip().lower() in BUILTIN_NAMES:
        return BUILTIN_BOOLQ
    if path:
        p = Path(os.path.expanduser(str(path))).resolve()
        if not p.is_file():
            raise GainError(f"eval.harness.boolq_path '{path}' is not a file")
        return p
    if hub_offline(datasets=True):
        return BUILTIN_BOOLQ
    return None


# --------------------------------------------------------------------------------------------- model plumbing


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode and no autograd inside; each submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval reseeds python/numpy/torch; keep the caller's random streams (training order, dropout) untouched."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (``model.device`` when it has one, else its first parameter's; CPU if none)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    dt = getattr(model, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return torch.float32


def _forward_parameter(model: torch.nn.Module, name: str) -> inspect.Parameter | None:
    """The parameter ``name`` of ``model.forward`` (None if it has none or its signature cannot be read)."""
    try:
        return inspect.signature(model.forward).parameters.get(name)
    except (TypeError, ValueError):
        return None


def _needs_attention_mask(model: torch.nn.Module) -> bool:
    param = _forward_parameter(model, "attention_mask")
    return param is not None and param.default is inspect.Parameter.empty


class _Output:
    __slots__ = ("logits",)

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class HarnessModelAdapter(torch.nn.Module):
    """What HFLM needs of a model object, around any causal LM module.

    Works for PreTrainedModel, PeftModel and modules that only quack like one (``.config``, a
    ``forward(input_ids, attention_mask)`` returning logits or an object with ``.logits``). It also keeps HFLM's
    ``tie_weights()`` call away from the real model (which could silently re-tie deliberately untied weights).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        config = getattr(model, "config", None)
        if config is None:
            from transformers import PretrainedConfig

            config = PretrainedConfig()
        self.config = config
        self.name_or_path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "") or ""
        self._mask_required = _needs_attention_mask(model)

    @property
    def device(self) -> torch.device:
        return model_device(self.inner)

    @property
    def dtype(self) -> torch.dtype:
        return _model_dtype(self.inner)

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """No-op: the model is evaluated exactly as it is."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> _Output:
        if attention_mask is None and self._mask_required:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return _Output(_logits_of(self.inner(input_ids=input_ids, **kwargs)))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(self.inner, "generate"):
            raise GainError(f"{type(self.inner).__name__} cannot generate text; use log-likelihood tasks only")
        return self.inner.generate(*args, **kwargs)


# --------------------------------------------------------------------------------------------- lm-eval


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in _EXPECTED_LMEVAL_WARNINGS)


_ENV_INFO: dict[str, Any] | None = None


def _cached_env_info(storage: dict[str, Any]) -> None:
    """lm-eval's add_env_info, computed once per process."""
    global _ENV_INFO
    if _ENV_INFO is None:
        from lm_eval.loggers.utils import add_env_info

        _ENV_INFO = {}
        add_env_info(_ENV_INFO)
    storage.update(_ENV_INFO)


@contextlib.contextmanager
def _quiet_lmeval(progress: bool) -> Iterator[None]:
    """lm-eval logging at WARNING with its expected per-call warnings dropped; datasets' progress bars off.

    Call after lm-eval's modules are imported: a logging filter only acts on the logger it is attached to.
    """
    import datasets

    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    lm_logger.setLevel(logging.WARNING)
    flt = _QuietFilter()
    emitters = [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                if isinstance(lg, logging.Logger) and (name == "lm_eval" or name.startswith("lm_eval."))]
    for lg in emitters:
        lg.addFilter(flt)
    bars_off = not progress and not datasets.are_progress_bars_disabled()
    if bars_off:
        datasets.disable_progress_bars()
    import lm_eval.api.task as lm_task  # its request-building loop has an unconditional tqdm bar
    import lm_eval.evaluator as lm_evaluator

    old_tqdm, old_env_info = lm_task.tqdm, lm_evaluator.add_env_info
    if not progress:
        lm_task.tqdm = functools.partial(old_tqdm, disable=True)
    # simple_evaluate collects torch's environment report (runs `pip list` and friends, ~0.5 s) on every call
    lm_evaluator.add_env_info = _cached_env_info
    try:
        yield
    finally:
        lm_task.tqdm, lm_evaluator.add_env_info = old_tqdm, old_env_info
        for lg in emitters:
            lg.removeFilter(flt)
        lm_logger.setLevel(old_level)
        if bars_off:
            datasets.enable_progress_bars()


_DEFAULT_TASK_MANAGER: Any = None


def _default_task_manager() -> Any:
    """lm-eval's full task index (~14,700 tasks, 5-9 s to build on 2 cores): built once per process."""
    global _DEFAULT_TASK_MANAGER
    if _DEFAULT_TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _DEFAULT_TASK_MANAGER = TaskManager()
    return _DEFAULT_TASK_MANAGER


TASK_FILE_SUFFIXES = (".yaml", ".yml", ".jsonl")  # a task YAML (lm-eval's format) or a bare JSONL task file


def task_file(name: str) -> Path | None:
    """The task file (a task YAML or a bare JSONL task, gain_cli/evaluation/jsonl_tasks.py) an ``eval.harness.tasks``
    entry names, or None (a task name). GainError for an entry that names a task file that is not there."""
    path = Path(os.path.expanduser(name))
    if path.suffix.lower() not in TASK_FILE_SUFFIXES:
        return None
    if not path.is_file():
        raise GainError(f"eval.harness.tasks: task file '{name}' does not exist (a task YAML or a JSONL task file; "
                        "relative paths are taken from the working directory)")
    return path.resolve()


LOCAL_TASKS = ("boolq", "cloze")  # built by gain from local data (a name lm-eval also knows, for boolq)


def check_task_names(tasks) -> None:
    """Every ``eval.harness.tasks`` entry is a local task, a task YAML file, a JSONL task file (checked line by line)
    or a task lm-eval knows: one line now, not after the model loads and the base evaluation ran. lm-eval's index is
    built only when a name needs it (it is local: no download)."""
    import difflib

    others: list[str] = []
    names: dict[str, str] = {}
    for entry in map(str, tasks):
        path = task_file(entry)
        if path is not None and path.suffix.lower() == ".jsonl":
            name = jsonl_task_name(path)
            load_task_jsonl(path)
            if name in names or (name in LOCAL_TASKS and name in map(str, tasks)):
                raise GainError(f"eval.harness.tasks: two tasks named '{name}' ({names.get(name, name)}, {entry})")
            names[name] = entry
        elif path is None and entry not in LOCAL_TASKS:
            others.append(entry)
    if not others:
        return
    known = set(_default_task_manager().all_tasks)
    for name in others:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known) + list(LOCAL_TASKS), n=5)
            hint = f"close: {', '.join(close)}" if close else "see `lm-eval ls tasks`"
            raise GainError(f"eval.harness.tasks: unknown task '{name}' (local: {', '.join(LOCAL_TASKS)}, a task YAML "
                            f"or JSONL task file, or one of lm-eval's {len(known):,} tasks; {hint})")


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def interleave_labels(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Yes, no, yes, no, ... (each side in its file order; when one side runs out, the other's rest in order): the
    first N items hold ceil(N/2) yes and floor(N/2) no while both sides last."""
    yes = [it for it in items if it["label"]]
    no = [it for it in items if not it["label"]]
    out: list[Mapping[str, Any]] = []
    for i in range(max(len(yes), len(no))):
        out += [side[i] for side in (yes, no) if i < len(side)]
    return out


def write_boolq_task(source: Path, work_dir: Path, balanced: bool = False) -> Path:
    """Normalise ``source`` into ``work_dir/boolq.jsonl`` (yes/no interleaved when ``balanced``) and write the local
    ``boolq`` task YAML next to it.

    Returns the directory holding the YAML (to register with ``TaskManager(include_path=...)``).
    """
    import yaml

    items = load_boolq_jsonl(source)
    if balanced:
        items = interleave_labels(items)
    work_dir = Path(work_dir).resolve()
    task_dir = work_dir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = work_dir / "boolq.jsonl"
    # unchanged content keeps its mtime, so datasets reuses its cache across stages
    _write_if_changed(data_file, "".join(
        json.dumps({"question": it["question"], "passage": it["passage"], "label": int(it["label"]), "idx": it["idx"]},
                   ensure_ascii=False) + "\n" for it in items))
    task = yaml.safe_load((TASK_TEMPLATES / "boolq_local.yaml").read_text(encoding="utf-8"))
    task["dataset_kwargs"] = {"data_files": {"validation": str(data_file)},
                              "cache_dir": str(work_dir / "hf_datasets_cache")}
    _write_if_changed(task_dir / "boolq.yaml", f"# written by gain from {source}\n"
                      + yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return task_dir


class _HFLMFactory:
    """Builds an HFLM subclass lazily (importing lm_eval's evaluator and HFLM costs ~0.6-1 s; paid only when the harness runs)."""

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is None:
            from lm_eval.models.huggingface import HFLM

            class GainHFLM(HFLM):
                """HFLM on a model object: no hub lookups for model info, optional progress bars, and (with
                ``fast_single_token``) the one-pass scorer for single-token continuations."""

                show_progress = False
                fast_single_token = False

                def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
                    def lm_eval_scores(reqs):
                        return super(GainHFLM, self)._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm,
                                                                           override_bs=override_bs)

                    if not self.fast_single_token:
                        return lm_eval_scores(requests)
                    return _fast_loglikelihood_tokens(self, requests, override_bs, lm_eval_scores)

                def get_model_info(self) -> dict:
                    return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                            "model_dtype": str(_model_dtype(self._model))}

                def loglikelihood(self, requests, disable_tqdm: bool = False):
                    return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

                def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                    return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

                def generate_until(self, requests, disable_tqdm: bool = False):
                    return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

            cls.cls = GainHFLM
        return cls.cls


def harness_results(model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any] | None, work_dir: str | Path,
                    *, log_samples: bool = False, fast: bool = False) -> dict[str, Any] | None:
    """Run lm-eval on the model in memory and return its full results dict (None if disabled or no tasks).

    ``log_samples=True`` keeps lm-eval's per-item records under ``["samples"][task]``. ``fast=True`` scores the
    requests whose continuation is a single token with the one-pass scorer (``score_single_token_requests``: the
    same numbers as lm-eval's, see the fast path below); lm-eval builds, scores the rest of, and evaluates everything.
    """
    cfg = resolve_harness_cfg(cfg)
    if not cfg["enabled"] or not cfg["tasks"]:
        return None
    _check_tokenizer(tokenizer)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    specs: list[str] = []
    local_dir: Path | None = None
    needs_index = False  # a task name (not a local YAML file) needs lm-eval's full task index
    for name in cfg["tasks"]:
        if name == "boolq":
            source = boolq_source(cfg)
            if source is not None:
                if source == BUILTIN_BOOLQ and not cfg["boolq_path"]:
                    log.info("hub offline: BoolQ evaluated on the packaged 24-item set (%s)", BUILTIN_BOOLQ)
                local_dir = write_boolq_task(source, work_dir, cfg["boolq_balanced"])
                specs.append(str(local_dir / "boolq.yaml"))
                continue
        if name == "cloze":
            local_dir = write_cloze_task(cloze_source(cfg), work_dir, _write_if_changed)
            specs.append(str(local_dir / "cloze.yaml"))
            continue
        path = task_file(name)
        if path is not None and path.suffix.lower() == ".jsonl":
            specs.append(str(write_jsonl_task(path, work_dir, _write_if_changed)))
        elif path is not None:
            specs.append(str(path))
        else:
            specs.append(name)
            needs_index = True

    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm_cls = _HFLMFactory.get()  # imports lm_eval.models.huggingface (and with it the evaluator's dependencies)
    with _quiet_lmeval(cfg["progress"]):
        if needs_index:
            task_manager = _default_task_manager()
        else:  # only local task files: skip indexing lm-eval's ~14,700 YAMLs
            task_manager = TaskManager(include_path=str(local_dir) if local_dir else None, include_defaults=False)
        with eval_mode(model), _preserved_rng(), no_kv_cache(model), quiet_git_probe():
            lm = lm_cls(pretrained=HarnessModelAdapter(model), tokenizer=tokenizer, batch_size=cfg["batch_size"],
                        max_batch_size=64)
            lm.show_progress = cfg["progress"]
            lm.fast_single_token = fast
            # one lm-eval call per distinct (limit, num_fewshot) (per-task mappings); their results merged
            limits, shots = per_task(cfg, "limit"), per_task(cfg, "num_fewshot")
            calls: dict[tuple[Any, Any], list[str]] = {}
            for name, spec in zip(cfg["tasks"], specs):
                calls.setdefault((limits[name], shots[name]), []).append(spec)
            try:
                results: dict[str, Any] = {}
                for (limit, num_fewshot), group in calls.items():
                    part = simple_evaluate(model=lm, tasks=group, num_fewshot=num_fewshot, limit=limit,
                                           task_manager=task_manager, bootstrap_iters=cfg["bootstrap_iters"],
                                           log_samples=log_samples)
                    for key, value in (part or {}).items():
                        if isinstance(value, dict) and isinstance(results.get(key), dict):
                            results[key].update(value)
                        elif key not in results:
                            results[key] = value
            except KeyError as exc:
                if "not a registered task" not in str(exc):
                    raise
                raise GainError(f"eval.harness.tasks: {exc.args[0] if exc.args else exc}") from exc
            except OSError as exc:  # datasets: ConnectionError / DatasetNotFoundError / missing files
                hint = (" (the hub is offline: tasks other than local ones (boolq, cloze, task files) need their data "
                        "in the HF datasets cache)" if hub_offline(datasets=True) else "")
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise GainError(f"eval.harness: lm-eval could not load a task's data: {first}{hint}") from exc
            except RuntimeError as exc:  # datasets >= 4 refuses the loading scripts of old hub datasets
                if "scripts are no longer supported" not in str(exc):
                    raise
                raise GainError(f"eval.harness: {str(exc).splitlines()[0]}: this lm-eval's task loads its data with a "
                                "dataset script, which datasets >= 4 refuses; lm-eval >= 0.4.10 reads script-free "
                                "copies (e.g. piqa: baber/piqa), or give a task YAML with a parquet dataset_path "
                                "(docs/downstream-tasks.md)") from exc
            finally:
                lm._model = None  # HFLM holds the model; let it go with the call
    return results


def summarize_results(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, ..., "n": items}}`` from lm-eval results (metrics of the unfiltered output by their
    plain name, e.g. ``acc``/``acc_stderr``; other filters as ``metric,filter``)."""
    out: dict[str, dict[str, float]] = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        if task in n_samples:
            row["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        out[task] = row
    return out


def per_item_acc(results: Mapping[str, Any], task: str) -> list[float] | None:
    """The per-doc ``acc`` (0.0/1.0) of ``task`` in doc order, from lm-eval's logged samples (None when the task has
    no samples or its samples carry no ``acc``, e.g. a group or a perplexity task)."""
    samples = (results.get("samples") or {}).get(task)
    if not samples or any("acc" not in s for s in samples):
        return None
    return [float(s["acc"]) for s in sorted(samples, key=lambda s: int(s["doc_id"]))]


@contextlib.contextmanager
def quiet_git_probe():
    """lm-eval records the git commit of the working directory with ``git describe``, whose "fatal: not a git
    repository" would be printed into every evaluation run outside a checkout: the same probe, its stderr
    silenced, for the duration of an evaluation."""
    import subprocess

    import lm_eval.evaluator as evaluator
    import lm_eval.loggers.utils as logger_utils

    def commit() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return logger_utils.get_commit_from_path(os.getcwd())

    saved = evaluator.get_git_commit_hash, logger_utils.get_git_commit_hash
    evaluator.get_git_commit_hash = logger_utils.get_git_commit_hash = commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, logger_utils.get_git_commit_hash = saved


LM_EVAL_DIR = "lm_eval"  # a row's lm-eval output, in the layout of lm-eval's own --output_path


def save_lm_eval_results(results: Mapping[str, Any], out_dir: str | Path, samples: bool = False) -> Path:
    """Write lm-eval's results (and, with ``samples``, its per-item samples) into ``out_dir`` with lm-eval's own
    ``EvaluationTracker``: ``results_<date>.json`` (keys ``results``, ``configs``, ``versions``, ``n-shot``,
    ``n-samples``, ``higher_is_better``, ``task_hashes``, ...) and ``samples_<task>_<date>.jsonl``, the files
    ``lm_eval --output_path`` writes and lm-eval's tooling reads. Returns the results file."""
    import copy

    from lm_eval.loggers import EvaluationTracker

    out_dir = Path(out_dir)
    results = copy.deepcopy(dict(results))
    per_item = results.pop("samples", None) or {}
    tracker = EvaluationTracker(output_path=str(out_dir))
    with _quiet_lmeval(False):
        tracker.save_results_aggregated(results=results, samples=per_item if samples else None)
        if samples:
            for task, items in per_item.items():
                tracker.save_results_samples(task_name=task, samples=copy.deepcopy(items))
    written = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not written:
        raise GainError(f"lm-eval did not write its results file under {out_dir} (is the directory writable?)")
    return written[-1]


def run_harness(model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any] | None,
                work_dir: str | Path, results_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate the in-memory model on ``cfg["tasks"]`` with lm-eval; ``{task: {"acc", "acc_stderr", "n", "per_item",
    ...}}``.

    ``per_item`` is the list of per-doc ``acc`` values (0.0/1.0) in doc order (lm-eval's logged samples; its mean is
    ``acc`` and its length ``n``), for confidence intervals by bootstrap over items. ``cfg`` is the eval config's
    ``harness`` block (gain_cli.schemas.run.HarnessConfig); ``work_dir`` receives the local task YAML, the normalised BoolQ file and
    its datasets cache; ``results_dir`` (when given) lm-eval's own results files (``save_lm_eval_results``). Returns
    {} when disabled. The model's train/eval modes, the global random streams and the weights are as before.
    """
    results = harness_results(model, tokenizer, cfg, work_dir, log_samples=True)
    if results is None:
        return {}
    if results_dir is not None:
        save_lm_eval_results(results, results_dir, samples=resolve_harness_cfg(cfg)["save_samples"])
    out: dict[str, dict[str, Any]] = summarize_results(results)
    for task, row in out.items():
        items = per_item_acc(results, task)
        if items is not None:
            row["per_item"] = items
    return out


# --------------------------------------------------------------------------------------------- fast path
#
# The one-pass scorer: lm-eval's (log-likelihood, is_greedy) of every request whose continuation is a single token,
# computed the way HFLM._loglikelihood_tokens computes it (same context windows, batches and right padding with 0
# and no mask, the log-softmax in the logits' own dtype, e.g. bf16 on a bf16 model, HFLM's ``softmax_dtype`` when
# set, the same argmax for is_greedy), in less work: one forward per distinct context (as lm-eval's
# one-token-continuation cache), the LM head and the log-softmax only at each context's last position (HF's
# ``logits_to_keep``) where lm-eval computes them at every position. Multi-token continuations are left to lm-eval's
# own code. Used through ``harness_results(..., fast=True)`` and by ``score_multiple_choice`` / ``score_yes_no``
# (gain bench); runs use lm-eval's scoring.


def _right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [batch, longest] padded with ``pad_id`` on the right, length of each row)."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


def _forward_logprobs(model: torch.nn.Module, rows: list[list[int]], pad_id: int,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Right-padded batch through the model with its padding mask; log-softmax over the vocabulary,
    [batch, len, vocab] (the reference the fast path is checked against)."""
    ids, lengths = _right_padded(rows, pad_id)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    device = model_device(model)
    logits = _logits_of(model(input_ids=ids.to(device), attention_mask=mask.to(device)))
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(...)`` takes HF's ``logits_to_keep`` (LM head on chosen positions only); PeftModel forwards
    it to its base model, HarnessModelAdapter to the model it wraps."""
    target = model.inner if isinstance(model, HarnessModelAdapter) else model
    target = target.get_base_model() if hasattr(target, "get_base_model") else target
    return _forward_parameter(target, "logits_to_keep") is not None


def _next_token_logprobs(model: torch.nn.Module, rows: list[list[int]], pad_id: int, needs_mask: bool,
                         keeps_logits: bool, dtype: torch.dtype | None = None,
                         autocast: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities of the token after each row, [batch, vocab], in the logits' dtype (``dtype`` when given:
    lm-eval's ``softmax_dtype``); the forward under ``autocast`` when given (lm-eval's ``mixed_precision_dtype``).

    Rows are right-padded and go in without a padding mask (as lm-eval's): in a causal LM a row's last real position
    only attends to the positions before it, so the pads after it change nothing there. Only the last real position
    of each row goes through the LM head when the model accepts ``logits_to_keep`` (``keeps_logits``; a 1-D tensor of
    positions, the same for the whole batch: the distinct last positions). ``needs_mask``: the model's forward
    requires an attention mask (all ones here).
    """
    ids, lengths = _right_padded(rows, pad_id)
    last = lengths - 1
    device = model_device(model)
    kwargs: dict[str, Any] = {}
    if needs_mask:
        kwargs["attention_mask"] = torch.ones_like(ids).to(device)
    if keeps_logits:
        keep, where = torch.unique(last, return_inverse=True)
        kwargs["logits_to_keep"] = keep.to(device)
    else:
        where = last
    with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
        logits = _logits_of(model(input_ids=ids.to(device), **kwargs))
    picked = logits[torch.arange(len(rows), device=logits.device), where.to(logits.device)]
    return torch.log_softmax(picked, dim=-1, dtype=dtype)  # outside autocast, in the logits' dtype: as lm-eval


def score_single_token_requests(model: torch.nn.Module, contexts: Sequence[Sequence[int]], tokens: Sequence[int],
                                batch_size: int = 8, max_length: int = 2048, softmax_dtype: torch.dtype | None = None,
                                autocast: torch.dtype | None = None) -> list[tuple[float, bool]]:
    """lm-eval's ``(log-probability, is_greedy)`` of token ``tokens[i]`` right after the token ids ``contexts[i]``.

    As HFLM._loglikelihood_tokens does for a one-token continuation: the window is the context's last
    ``max_length`` tokens; requests with the same context share one forward, the contexts go in lm-eval's order
    (longest first, then by their ids) in batches of ``batch_size``, right-padded with 0, without a mask; the
    log-softmax is taken in the logits' dtype (``softmax_dtype`` when given) and the log-probability read from it,
    so a bf16 model's near-tied choices tie exactly where lm-eval's do; is_greedy is the argmax of those
    log-probabilities (the first maximum) being the token. The model must be causal.
    """
    if batch_size < 1:
        raise GainError(f"batch_size must be >= 1, got {batch_size}")
    if len(contexts) != len(tokens):
        raise ValueError(f"{len(contexts)} contexts for {len(tokens)} tokens")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ctx in enumerate(contexts):
        if not ctx:
            raise GainError(f"request {i}: empty context (lm-eval gives the prefix token as the context)")
        groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups, key=lambda c: (-len(c), c))
    target = model.inner if isinstance(model, HarnessModelAdapter) else model
    needs_mask = _needs_attention_mask(model)
    keeps_logits = _accepts_logits_to_keep(model)
    out: list[tuple[float, bool] | None] = [None] * len(contexts)
    with eval_mode(target), no_kv_cache(target):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            lp = _next_token_logprobs(model, [list(c[-max_length:]) for c in chunk], 0, needs_mask, keeps_logits,
                                      softmax_dtype, autocast)
            greedy = lp.argmax(dim=-1).tolist()
            for row, ctx in enumerate(chunk):
                for i in groups[ctx]:
                    out[i] = (float(lp[row, tokens[i]]), greedy[row] == tokens[i])
    return out  # type: ignore[return-value]


def _fast_loglikelihood_tokens(lm: Any, requests: list, override_bs: int | None, lm_eval_scores) -> list:
    """GainHFLM._loglikelihood_tokens with ``fast_single_token``: requests ``((context, continuation), context ids,
    continuation ids)`` whose continuation is one token scored by ``score_single_token_requests``, the others by
    lm-eval's own code (``lm_eval_scores``); lm-eval's answers in request order, cached as lm-eval caches them."""
    batch_size = override_bs or lm.batch_size
    if lm.backend != "causal" or isinstance(batch_size, bool) or not isinstance(batch_size, int):
        return lm_eval_scores(requests)  # seq2seq, or batch_size "auto": lm-eval's own scoring throughout
    single = [i for i, req in enumerate(requests) if len(req[2]) == 1]
    if not single:
        return lm_eval_scores(requests)
    out: list[Any] = [None] * len(requests)
    rest = [i for i, req in enumerate(requests) if len(req[2]) != 1]
    if rest:
        for i, answer in zip(rest, lm_eval_scores([requests[i] for i in rest])):
            out[i] = answer
    answers = score_single_token_requests(lm.model, [requests[i][1] for i in single],
                                          [requests[i][2][0] for i in single], batch_size=batch_size,
                                          max_length=lm.max_length, softmax_dtype=lm.softmax_dtype,
                                          autocast=lm.mixed_precision_dtype)
    for i, answer in zip(single, answers):
        out[i] = answer
        if requests[i][0] is not None:
            lm.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return out


def _check_tokenizer(tokenizer: Any) -> None:
    from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

    if not isinstance(tokenizer, (PreTrainedTokenizer, PreTrainedTokenizerFast)):  # what HFLM accepts
        raise GainError(f"the harness needs a transformers tokenizer, got {type(tokenizer).__name__}")


def choice_loglikelihoods(model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]],
                          batch_size: int = 8, target_delimiter: str = TARGET_DELIMITER) -> list[list[float]]:
    """Per item ``(context, choices)`` the log-likelihood of each ``target_delimiter + choice`` after ``context``:
    lm-eval's numbers for a multiple-choice doc (its HFLM.loglikelihood on the requests lm-eval builds for such a doc:
    the same encoding, truncation and scores), single-token choices in one pass (``score_single_token_requests``),
    longer ones by lm-eval's own code."""
    if batch_size < 1:
        raise GainError(f"batch_size must be >= 1, got {batch_size}")
    _check_tokenizer(tokenizer)
    lm_cls = _HFLMFactory.get()
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, target_delimiter + choice), idx=k)
                for ctx, choices in items for k, choice in enumerate(choices)]
    with _quiet_lmeval(False), eval_mode(model), no_kv_cache(model):
        lm = lm_cls(pretrained=HarnessModelAdapter(model), tokenizer=tokenizer, batch_size=batch_size,
                    max_batch_size=64)
        lm.fast_single_token = True
        try:
            scores = [ll for ll, _greedy in lm.loglikelihood(requests, disable_tqdm=True)]
        finally:
            lm._model = None
    out, at = [], 0
    for _ctx, choices in items:
        out.append(scores[at:at + len(choices)])
        at += len(choices)
    return out


def pick_choice(lls: Sequence[float], choices: Sequence[str] | None = None) -> int:
    """lm-eval's multiple-choice pick: ``argmax`` of the log-likelihoods (the first of equal maxima: ``acc``), or, with
    ``choices``, of the log-likelihoods divided by each choice's length in characters (``acc_norm``)."""
    import numpy as np

    values = np.asarray(lls, dtype=float)
    if choices is not None:
        values = values / np.array([float(len(c)) for c in choices])
    return int(np.argmax(values))


def score_multiple_choice(model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]],
                          batch_size: int = 8, target_delimiter: str = TARGET_DELIMITER,
                          norm: bool = False) -> list[int]:
    """Per item ``(context, choices)`` the index lm-eval's multiple-choice comparison picks (``acc``; ``norm``: the
    length-normalised pick of ``acc_norm``). One forward per batch of contexts when every choice is one token after
    its context (as for BoolQ's " yes"/" no" or " A"-" D" on most tokenizers)."""
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size, target_delimiter)
    return [pick_choice(ll, list(choices) if norm else None) for ll, (_ctx, choices) in zip(lls, items)]


def score_yes_no(model: torch.nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]],
                 batch_size: int = 8) -> list[int]:
    """Per item 1 if lm-eval's BoolQ comparison picks "yes", else 0 (ties go to "no", like its argmax).

    ``score_multiple_choice`` on the BoolQ prompt with the choices "no", "yes": ``prompt + " yes"`` vs
    ``prompt + " no"`` scored exactly as lm-eval's HFLM.loglikelihood does, the log-softmax in the model's dtype.
    """
    return score_multiple_choice(model, tokenizer, [(boolq_prompt(it), BOOLQ_CHOICES) for it in items], batch_size)
