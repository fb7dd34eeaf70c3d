"""The run directory's result matrices: the one place that defines their format, writer and loader.

``<run>/<name>.json``::

    {"metric": "ppl", "domains": [d1, ..., dT], "rows": ["base", "stage_1:d1", ...], "values": [[...], ...]}

(``"tasks"`` instead of ``"domains"`` for the harness matrix, ``"metric": "acc"``). Row 0 is the base
model, row k the model after training stage k; a partial run has fewer than T+1 rows. Non-finite
values are stored as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON); ``null`` reads as NaN.
``<run>/<name>.csv`` holds the same numbers: header ``row,<col1>,...``, one line per row.

The harness matrices are ``harness_matrix`` (lm-eval's ``acc``) and, where a task reports them,
``harness_matrix_acc_stderr``, ``harness_matrix_acc_norm`` and ``harness_matrix_acc_norm_stderr``; lm-eval's own
results files of each row lie in ``base/lm_eval/`` and ``stages/stage_K/lm_eval/``.

``load_run`` reads ``ppl_matrix.json`` (required), the harness matrices (optional),
``config.yaml`` and ``run_info.json`` (optional) into a :class:`RunResult`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from gain_cli.errors import GainError
from gain_cli.io import atomic_write_csv, atomic_write_json
from gain_cli.reporting.metrics import compute_metrics
from gain_cli.reporting.uncertainty import run_samples
from gain_cli.rundir import HARNESS_MATRIX, RunDir

HARNESS_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")  # lm-eval's names; one matrix each


def harness_matrix_name(metric: str) -> str:
    """``harness_matrix`` for acc (the main one), ``harness_matrix_<metric>`` for the others."""
    return HARNESS_MATRIX if metric == "acc" else f"{HARNESS_MATRIX}_{metric}"
BASE_ROW = "base"
_STAGE_ROW = re.compile(r"^stage_(\d+)(?::(.*))?$")


def stage_label(k: int, domain: str) -> str:
    """Row label of stage k (1-based) trained on ``domain``: ``stage_k:domain``."""
    return f"{BASE_ROW}" if k == 0 else f"stage_{k}:{domain}"


def row_stage(label: str) -> int:
    """The stage of a row label: 0 for ``base``, K for ``stage_K:<domain>`` (GainError for anything else)."""
    if label == BASE_ROW:
        return 0
    m = _STAGE_ROW.match(label)
    if not m:
        raise GainError(f"row label '{label}' is neither '{BASE_ROW}' nor 'stage_K:<domain>'")
    return int(m.group(1))


def _cell_out(v: Any) -> float | str:
    f = float(v)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def write_matrix(run_dir: str | os.PathLike, name: str, metric: str, columns: Sequence[str],
                 rows: Sequence[str], values: Sequence[Sequence[float]], column_key: str | None = None
                 ) -> tuple[Path, Path]:
    """Atomically write ``<run_dir>/<name>.json`` and ``<run_dir>/<name>.csv``; return both paths.

    ``column_key`` names the column list in the JSON: by default ``"domains"`` for ``metric="ppl"``
    and ``"tasks"`` otherwise.
    """
    columns, rows = [str(c) for c in columns], [str(r) for r in rows]
    if len(values) != len(rows):
        raise ValueError(f"{name}: {len(rows)} row labels but {len(values)} rows of values")
    cells = []
    for label, row in zip(rows, values):
        if len(row) != len(columns):
            raise ValueError(f"{name}: row {label!r} has {len(row)} values for {len(columns)} columns")
        cells.append([_cell_out(v) for v in row])
    key = column_key or ("domains" if metric == "ppl" else "tasks")
    run_dir = Path(run_dir)
    j = atomic_write_json(run_dir / f"{name}.json", {"metric": metric, key: columns, "rows": rows, "values": cells})
    c = atomic_write_csv(run_dir / f"{name}.csv", ["row", *columns],
                         [[label, *(repr(v) if isinstance(v, float) else v for v in row)]
                          for label, row in zip(rows, cells)])
    return j, c


@dataclass
class Matrix:
    """One result matrix as read from disk."""

    metric: str
    columns: list[str]
    rows: list[str]
    values: np.ndarray  # (len(rows), len(columns)), float


def _cell_in(v: Any, path: Path) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, bool):
        raise GainError(f"{path}: malformed matrix (value {v!r} is not a number)")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise GainError(f"{path}: malformed matrix (value {v!r} is not a number)")


def read_matrix(path: str | os.PathLike) -> Matrix:
    """Read and validate one ``<name>.json`` matrix; GainError naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise GainError(f"{path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GainError(f"{path}: cannot read the matrix ({e})") from None
    if not isinstance(obj, dict):
        raise GainError(f"{path}: malformed matrix (expected a JSON object)")
    key = next((k for k in ("domains", "tasks", "columns") if k in obj), None)
    columns, rows, values = obj.get(key) if key else None, obj.get("rows"), obj.get("values")
    if not (isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)):
        raise GainError(f"{path}: malformed matrix (needs a non-empty 'domains' or 'tasks' list of names)")
    if not (isinstance(rows, list) and rows and all(isinstance(r, str) for r in rows)):
        raise GainError(f"{path}: malformed matrix (needs a non-empty 'rows' list of labels)")
    if not (isinstance(values, list) and len(values) == len(rows)
            and all(isinstance(r, list) and len(r) == len(columns) for r in values)):
        raise GainError(f"{path}: malformed matrix ('values' must be {len(rows)} rows of {len(columns)} numbers)")
    arr = np.array([[_cell_in(v, path) for v in r] for r in values], dtype=float).reshape(len(rows), len(columns))
    return Matrix(metric=str(obj.get("metric", "")), columns=list(columns), rows=list(rows), values=arr)


def _check_row_labels(rows: list[str], domains: list[str], path: Path) -> None:
    if rows[0] != BASE_ROW:
        raise GainError(f"{path}: malformed matrix (row 0 must be '{BASE_ROW}', got {rows[0]!r})")
    if len(rows) > len(domains) + 1:
        raise GainError(f"{path}: malformed matrix ({len(rows)} rows for {len(domains)} domains; "
                        f"at most base + {len(domains)} stages)")
    for k, label in enumerate(rows[1:], 1):
        m = _STAGE_ROW.match(label)
        if m is None or int(m.group(1)) != k or (m.group(2) is not None and m.group(2) != domains[k - 1]):
            raise GainError(f"{path}: malformed matrix (row {k} is {label!r}, expected "
                            f"'{stage_label(k, domains[k - 1])}': columns must be the domains in training order)")


@dataclass
class RunResult:
    """Everything the reports need from one run directory."""

    path: Path
    name: str                      # the run directory's name
    method: str
    recipe: str
    model: str
    domains: list[str]             # columns of the PPL matrix, in training order
    rows: list[str]                # "base", "stage_1:d1", ...
    ppl: np.ndarray                # (len(rows), len(domains))
    harness: dict[str, np.ndarray] | None = None   # task -> accuracy per row (NaN where missing)
    # lm-eval's other metrics: metric (acc_stderr, acc_norm, acc_norm_stderr) -> task -> value per row
    harness_extra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)   # run_info.json

    @property
    def stages_done(self) -> int:
        return len(self.rows) - 1

    @property
    def complete(self) -> bool:
        return self.stages_done == len(self.domains)

    @property
    def status(self) -> str:
        return str(self.info.get("status") or ("complete" if self.complete else "partial"))

    @cached_property
    def samples(self):
        """Per-block NLLs and per-item scores of the rows (:class:`~gain_cli.reporting.uncertainty.RunSamples`),
        or None when the run did not keep them (made before they were kept)."""
        rows = RunDir(self.path).rows()[: len(self.rows)]
        try:
            return run_samples(rows, self.domains) if len(rows) == len(self.rows) else None
        except GainError:
            return None

    @cached_property
    def metrics(self):
        """The run's :class:`~gain_cli.reporting.metrics.ForgettingMetrics` (computed once)."""
        return compute_metrics(self.ppl, self.domains, self.harness)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GainError(f"{path}: cannot read the config ({e})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise GainError(f"{path}: malformed config (expected a mapping)")
    return obj


def _load_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GainError(f"{path}: cannot read run info ({e})") from None
    if not isinstance(obj, dict):
        raise GainError(f"{path}: malformed run info (expected a JSON object)")
    return obj


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def load_run(run_dir: str | os.PathLike) -> RunResult:
    """Load a run directory's matrices, config and run info; GainError when missing or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GainError(f"run directory {run_dir} does not exist")
    ppl_path = RunDir(run_dir).matrix_path()
    if not ppl_path.is_file():
        raise GainError(f"{ppl_path} not found: {run_dir} is not a gain run directory, "
                        "or its base-model evaluation has not finished yet")
    mat = read_matrix(ppl_path)
    _check_row_labels(mat.rows, mat.columns, ppl_path)

    def harness_matrix(metric: str) -> dict[str, np.ndarray] | None:
        h_path = RunDir(run_dir).matrix_path(harness_matrix_name(metric))
        if not h_path.is_file():
            return None
        h = read_matrix(h_path)
        n = len(mat.rows)
        if h.rows[:n] != mat.rows[: len(h.rows)] or len(h.rows) > n:
            raise GainError(f"{h_path}: its rows {h.rows} do not match the PPL matrix's rows {mat.rows}")
        pad = np.full((n - len(h.rows), len(h.columns)), np.nan)
        vals = np.vstack([h.values, pad])
        return {task: vals[:, i].copy() for i, task in enumerate(h.columns)}

    harness = harness_matrix("acc")
    extra = {m: v for m in HARNESS_METRICS[1:] if (v := harness_matrix(m)) is not None} if harness else {}

    config = _load_yaml(RunDir(run_dir).config_path)
    info = _load_info(RunDir(run_dir).info_path)

    def pick(key: str, info_key: str) -> str:
        v = _get(config, key) or info.get(info_key)
        return str(v) if v else "unknown"

    method = str(_get(config, "method.name") or info.get("method") or run_dir.name)
    return RunResult(path=run_dir, name=run_dir.name, method=method, recipe=pick("recipe", "recipe"),
                     model=pick("model.name", "model"), domains=mat.columns, rows=mat.rows, ppl=mat.values,
                     harness=harness, harness_extra=extra, config=config, info=info)
