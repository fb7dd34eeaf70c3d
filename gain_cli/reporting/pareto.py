"""The forgetting–adaptation Pareto front of a sweep (``gain report pareto RUN_DIR... --out DIR``).

One point per run directory, from its ``ppl_matrix.json`` (P, row 0 = base, row k = after stage
k, columns in training order; a partial run counts up to its last finished stage T) and
``config.yaml`` (method name, base, lr, λ):

* x = **in-domain PPL improvement (%)** = −100 · mean_{j ≤ T} (P[j,j] − P[0,j]) / P[0,j]
  (the negated ``in_domain_change_mean`` of ``gain_cli.reporting.metrics``). Higher = better
  adaptation.
* y = **earlier-domain PPL change at the end (%)** = 100 · mean_{j < T} (P[T,j] − P[j,j]) / P[j,j]
  (``earlier_change_vs_own_mean``). Lower = better; positive = forgetting, negative = earlier
  domains improved. Undefined (NaN) for a run with one finished stage.

The front (``pareto_front``): maximise x, minimise y. A point is on the front iff no other point
has x' ≥ x and y' ≤ y with at least one strict inequality. Ties: identical points do not
dominate each other, so all copies of a non-dominated point are on the front; a point with the
same y but a smaller x (or the same x but a larger y) than another is dominated. Points with a
non-finite x or y are never on the front and dominate nothing.

The plot (``plot_pareto``) draws one colour per method (label = method name, plus the base
for the L2/EWC baselines when the name does not show it) and one marker per label. Where several
runs share a method, each one's label adds what differs between their configs (``config.yaml``:
every setting that determines the results, e.g. ``lora [steps 200, lr 0.0003]``; ``distinguish``),
so no two runs carry the same label. A point is annotated with its lr / λ (a method with one run)
or with that difference, and the front is drawn as a step line: between neighbouring front points (sorted by x) the line rises
vertically at the left point then runs horizontally, i.e. the boundary of the region the front
dominates (upper left). The table (``pareto.md`` / ``pareto.csv``) lists every point.

A sweep is a shell loop (the CLI composes configs with Hydra's compose API, so there is no
``--multirun``); the run directories default to ``runs/<recipe>/<method.name>/<run_name>``::

    R=tiny_8domains
    for lr in 1e-4 3e-4 1e-3; do
      gain run recipe=$R method=lora method.lr=$lr run_name=lr$lr
      for lam in 0.1 1 10; do
        gain run recipe=$R method=l2 method.lr=$lr method.lambda=$lam run_name=lr${lr}_lam$lam
      done
    done
    for lam in 1e3 1e4 1e5; do
      gain run recipe=$R method=ewc method.lambda=$lam run_name=lam$lam
      gain run recipe=$R method=ewc_lora method.lambda=$lam run_name=lam$lam
    done
    for lr in 1e-3 3e-3 1e-2; do gain run recipe=$R method=gain_ffn method.lr=$lr run_name=lr$lr; done
    gain run recipe=$R method=lora_replay run_name=default
    gain report pareto runs/$R/*/* --out reports/pareto
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gain_cli.config import PLACEMENT_KEYS
from gain_cli.errors import GainError
from gain_cli.io import atomic_write_csv, atomic_write_text, read_json
from gain_cli.reporting import figures
from gain_cli.reporting.metrics import compute_metrics
from gain_cli.rundir import RunDir

X_TITLE = "In-domain PPL improvement (%)"
Y_TITLE = "Earlier-domain PPL change at end (%)"
COLUMNS = ["run", "method", "base", "lr", "lambda", "stages", "in_domain_improvement_pct",
           "earlier_domain_change_pct", "on_front", "setting"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p"]


# --- points ------------------------------------------------------------------------------------

def _cell(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)  # also "nan" / "inf" / "-inf" as written by reporting.matrices
    except (TypeError, ValueError):
        raise GainError(f"non-numeric perplexity value {v!r}") from None


def _run_cfg(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as plain containers (interpolations resolved where they resolve); {} without one."""
    from omegaconf import OmegaConf

    path = RunDir(run_dir).config_path
    if not path.is_file():
        return {}
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001  (a broken config.yaml: report it, do not crash on it)
        raise GainError(f"{path}: cannot read the config ({type(exc).__name__}: {exc})") from None
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001  (an interpolation that does not resolve here: compare it as written)
        out = OmegaConf.to_container(cfg, resolve=False)
    return out if isinstance(out, dict) else {}


def _number(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _penalty(method: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(name, λ) of the penalty a run's method carries: ``method.penalty`` (a name, or a mapping with its
    settings; λ None = the penalty's default), the l2 / ewc methods' own ``lambda``, GAIN's own ``l2``."""
    penalty = method.get("penalty")
    if isinstance(penalty, Mapping):
        return str(penalty.get("name")), penalty.get("lambda")
    if penalty:
        return str(penalty), None
    return None, method.get("lambda", method.get("l2"))


def method_label(method: Mapping[str, Any]) -> str:
    name = str(method.get("name") or method.get("kind") or "?")
    base = method.get("base")
    label = f"{name} ({base})" if base and str(base) not in name else name
    penalty = _penalty(method)[0]
    return f"{label} + {penalty}" if penalty else label


def run_point(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The Pareto point of one run directory (keys as in ``COLUMNS`` plus ``x``, ``y``, ``label``, ``method_label``
    and ``config``, the run's config.yaml); ``label`` is the method's until :func:`distinguish` sets it."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).matrix_path()
    if not path.is_file():
        raise GainError(f"{run_dir} is not a gain run directory (no ppl_matrix.json)")
    try:
        m = read_json(path)
        values = [[_cell(v) for v in row] for row in m["values"]]
        domains = list(m["domains"])
    except (ValueError, KeyError, TypeError) as exc:
        raise GainError(f"{path}: not a perplexity matrix ({type(exc).__name__}: {exc})") from None
    if len(values) < 2:
        raise GainError(f"{run_dir} has no finished stage yet (only the base row in {path.name})")
    metrics = compute_metrics(values, domains)
    config = _run_cfg(run_dir)
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    lam = _penalty(method)[1]
    x = -100.0 * metrics.in_domain_change_mean
    y = math.nan if metrics.earlier_change_vs_own_mean is None else 100.0 * metrics.earlier_change_vs_own_mean
    return {
        "run": str(run_dir), "method": str(method.get("name") or "?"), "base": method.get("base"),
        "label": method_label(method), "method_label": method_label(method), "setting": "",
        "lr": _number(method.get("lr")), "lambda": _number(lam),
        "stages": metrics.stages_done, "domains": domains, "x": x, "y": y,
        "in_domain_improvement_pct": x, "earlier_domain_change_pct": y, "config": config,
    }


def pareto_points(run_dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One point per run directory, in the order given, labels told apart (see the module docstring)."""
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise GainError("no run directories given")
    return distinguish([run_point(rd) for rd in run_dirs])


# --- labels: what differs between runs of one method ---------------------------------------------

#: short names of the settings a label shows (others: their last dotted part), and the order they come in
SHORT_NAMES = {"method.name": "method", "method.base": "base", "train.steps": "steps", "method.lr": "lr",
               "method.lambda": "λ", "method.l2": "l2", "seed": "seed"}
MAX_SETTINGS = 4   # at most this many differing settings in a label, then "+N more"


def flat_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as dotted keys → values, without the settings that only say where a run goes and how it logs
    (``gain_cli.config.PLACEMENT_KEYS``): what determines its results."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(config, "")
    return {k: v for k, v in out.items() if not any(k == p or k.startswith(p + ".") for p in PLACEMENT_KEYS)}


def differing_settings(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose value is not the same in all ``configs`` (a key missing from one counts as differing),
    the :data:`SHORT_NAMES` first in their order, then the others sorted."""
    flats = [flat_settings(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    missing = object()
    diff = [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]
    order = list(SHORT_NAMES)
    return sorted(diff, key=lambda k: (order.index(k) if k in order else len(order), k))


def _value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return f"{v:g}"
    return str(v)


def setting_text(settings: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``steps 200, lr 0.0003, λ 10`` for the ``keys`` (at most :data:`MAX_SETTINGS`, then ``+N more``)."""
    names = {k: SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    parts = [f"{k if names[k] in clash else names[k]} {_value(settings.get(k))}" for k in keys[:MAX_SETTINGS]]
    if len(keys) > MAX_SETTINGS:
        parts.append(f"+{len(keys) - MAX_SETTINGS} more")
    return ", ".join(parts)


def distinguish(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give the points of runs that share a method label distinct labels: ``<method> [<what differs>]`` from the
    settings that differ between those runs' configs (:func:`differing_settings`), or ``<method> [<run dir name>]``
    where the configs do not tell them apart. Sets each point's ``label`` and ``setting``; returns ``points``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(p.get("method_label") or p["label"], []).append(p)
    for base, pts in groups.items():
        if len(pts) < 2:
            continue
        keys = differing_settings([p.get("config") or {} for p in pts])
        for p in pts:
            p["setting"] = setting_text(flat_settings(p.get("config") or {}), keys) if keys else ""
        texts = [p["setting"] for p in pts]
        for p in pts:
            if not p["setting"] or texts.count(p["setting"]) > 1:
                p["setting"] = ", ".join(x for x in (p["setting"], Path(p["run"]).name) if x)
            p["label"] = f"{base} [{p['setting']}]"
    return points


# --- the front -----------------------------------------------------------------------------------

def _xy(p: Any) -> tuple[float, float]:
    if isinstance(p, Mapping):
        return float(p["x"]), float(p["y"])
    x, y = p
    return float(x), float(y)


def pareto_front(points: Sequence[Any]) -> list[bool]:
    """For each point (a dict with ``x``, ``y`` or an (x, y) pair): is it on the front?

    Maximise x, minimise y; ties as in the module docstring. O(n²), fine for sweeps.
    """
    xy = [_xy(p) for p in points]
    finite = [math.isfinite(x) and math.isfinite(y) for x, y in xy]
    out = []
    for i, (x, y) in enumerate(xy):
        if not finite[i]:
            out.append(False)
            continue
        dominated = any(finite[j] and xj >= x and yj <= y and (xj > x or yj < y)
                        for j, (xj, yj) in enumerate(xy) if j != i)
        out.append(not dominated)
    return out


# --- outputs ---------------------------------------------------------------------------------------

def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.{nd}f}"
    return str(v)


def _fmt_g(v: float | None) -> str:
    return "" if v is None else f"{v:g}"


def _annotation(p: Mapping[str, Any]) -> str:
    if p.get("setting"):
        return p["setting"]
    parts = []
    if p.get("lr") is not None:
        parts.append(f"lr {p['lr']:g}")
    if p.get("lambda") is not None:
        parts.append(f"λ {p['lambda']:g}")
    return ", ".join(parts)


def plot_pareto(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "",
                formats: Sequence[str] | None = None) -> Path:
    """Scatter of the points (one colour per method, one marker per label) with the front as a step line; written
    as PNG (``path``) and as SVG and PDF next to it (``formats``, see ``figures.save_figure``)."""
    import matplotlib

    front = pareto_front(points)
    fig = figures._new_figure(7.5, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    labels: list[str] = []
    methods: list[str] = []
    for p in points:
        if p["label"] not in labels:
            labels.append(p["label"])
        if (p.get("method_label") or p["label"]) not in methods:
            methods.append(p.get("method_label") or p["label"])
    cmap = matplotlib.colormaps["tab10"]
    seen: list[tuple[float, float]] = []
    same: dict[int, int] = {}
    for label in labels:   # per point: how many drawn before it (labels in order) lie at the same place
        for p in points:
            if p["label"] == label:
                same[id(p)] = seen.count((p["x"], p["y"]))
                seen.append((p["x"], p["y"]))
    for k, label in enumerate(labels):
        pts = [(p, f) for p, f in zip(points, front) if p["label"] == label and math.isfinite(p["x"])
               and math.isfinite(p["y"])]
        if not pts:
            continue
        color = cmap(methods.index(pts[0][0].get("method_label") or label) % 10)
        # a point at the same place as earlier ones (equal results): drawn smaller on top, its note below theirs
        ax.scatter([p["x"] for p, _ in pts], [p["y"] for p, _ in pts], marker=MARKERS[k % len(MARKERS)],
                   s=[(70 if f else 40) * 0.55 ** same[id(p)] for p, f in pts], color=color, edgecolors="black",
                   linewidths=[1.4 if f else 0.3 for _, f in pts], label=label, zorder=3 + k)
        for p, _ in pts:
            note = _annotation(p)
            if note:
                ax.annotate(note, (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4 - 8 * same[id(p)]),
                            fontsize=6.5, color="0.3")
    fpts = sorted(((p["x"], p["y"]) for p, f in zip(points, front) if f))
    if fpts:
        ax.step([x for x, _ in fpts], [y for _, y in fpts], where="pre", color="black", linewidth=1.0,
                linestyle="--", label="Pareto front", zorder=2)
    ax.axhline(0.0, color="0.6", linewidth=0.7, zorder=1)
    ax.set_xlabel(X_TITLE + "  → better")
    ax.set_ylabel(Y_TITLE + "  ↓ better")
    ax.set_title(title or "Forgetting vs adaptation (front: bold outline, dashed line)", fontsize=10)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if labels:
        ax.legend(fontsize=8, loc="best")
    skipped = sum(1 for p in points if not (math.isfinite(p["x"]) and math.isfinite(p["y"])))
    if skipped:
        fig.text(0.01, 0.01, f"{skipped} run(s) without an earlier-domain value (one stage) not plotted",
                 fontsize=7, color="0.4")
    return figures.save_figure(fig, path, formats)


def _rows(points: Sequence[Mapping[str, Any]], front: Sequence[bool]) -> list[list[Any]]:
    order = sorted(range(len(points)), key=lambda i: (points[i]["label"], -points[i]["x"] if math.isfinite(points[i]["x"]) else math.inf))
    return [[points[i]["run"], points[i]["label"], points[i].get("base") or "", points[i]["lr"], points[i]["lambda"],
             points[i]["stages"], points[i]["x"], points[i]["y"], front[i], points[i].get("setting") or ""]
            for i in order]


def pareto_markdown(points: Sequence[Mapping[str, Any]], front: Sequence[bool],
                    skipped: Sequence[tuple[str, str]] = ()) -> str:
    lines = [
        "# Forgetting–adaptation Pareto front", "",
        f"x = {X_TITLE}: −100 · mean_j (P[j,j] − P[0,j]) / P[0,j]; higher = better.  ",
        f"y = {Y_TITLE}: 100 · mean_(j<T) (P[T,j] − P[j,j]) / P[j,j]; lower = better "
        "(negative = earlier domains improved).  ",
        "Front: no other run has both a higher-or-equal x and a lower-or-equal y (one strictly).", "",
    ]
    sequences = {tuple(p.get("domains") or ()) for p in points}
    stage_counts = {p["stages"] for p in points}
    if len(sequences) > 1 or len(stage_counts) > 1:
        lines += ["**Warning:** the runs do not share one domain sequence / number of finished stages "
                  f"({len(sequences)} sequence(s), stages {sorted(stage_counts)}); their points are not directly comparable.", ""]
    lines += [
        "| run | method | lr | λ | stages | in-domain improvement (%) | earlier-domain change (%) | front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, label, _base, lr, lam, stages, x, y, f, _setting in _rows(points, front):
        lines.append(f"| {Path(run).name} | {label} | {_fmt_g(lr)} | {_fmt_g(lam)} | {stages} | {_fmt(x)} | "
                     f"{_fmt(y)} | {'★' if f else ''} |")
    lines += ["", "Runs (full paths):", ""] + [f"- `{p['run']}`" for p in points]
    if skipped:
        lines += ["", "Skipped (not usable as a point):", ""] + [f"- `{rd}`: {why}" for rd, why in skipped]
    return "\n".join(lines) + "\n"


def write_pareto(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 skip_invalid: bool = True) -> Path:
    """Write ``pareto.png`` (and ``pareto.svg``, ``pareto.pdf``), ``pareto.md`` and ``pareto.csv`` into ``out_dir``;
    return ``out_dir``. Points of runs that share a method are labelled by what differs between them (``distinguish``).

    With ``skip_invalid`` (default) a directory that gives no point (no ``ppl_matrix.json``, only the
    base row, e.g. a crashed run caught by a shell glob) is left out and listed under "Skipped" in
    ``pareto.md``; if no directory gives a point, or with ``skip_invalid=False``, it is an error.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise GainError("no run directories given")
    points, skipped = [], []
    for rd in run_dirs:
        try:
            points.append(run_point(rd))
        except GainError as exc:
            if not skip_invalid:
                raise
            skipped.append((str(rd), str(exc)))
    if not points:
        raise GainError("no usable run among the given directories: " + "; ".join(why for _, why in skipped))
    distinguish(points)
    front = pareto_front(points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pareto(points, out / "pareto.png")
    atomic_write_text(out / "pareto.md", pareto_markdown(points, front, skipped))
    atomic_write_csv(out / "pareto.csv", COLUMNS,
                     [[run, label, base, _fmt_g(lr), _fmt_g(lam), stages, repr(x), repr(y), str(f).lower(), setting]
                      for run, label, base, lr, lam, stages, x, y, f, setting in _rows(points, front)])
    return out
