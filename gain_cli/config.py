"""Hydra composition: `configs/` (groups model/ method/ domains/ train/ eval/) + `recipes/`.

Both directories ship inside the installed package (hatch force-include) and are used
from the source tree in an editable install. A recipe is a `# @package _global_` file
whose defaults override the groups; the command line beats the recipe.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gain_cli.config_files import _package_dir, config_root, configs_dir, recipes_dir  # noqa: F401  (re-exported)
from gain_cli.errors import GainError, unknown_choice

GROUPS = ("model", "method", "domains", "train", "eval", "launcher")
DEFAULT_RECIPE = "smollm2_8domains"


def _names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def group_choices(group: str) -> list[str]:
    return _names(configs_dir() / group)


def recipe_choices() -> list[str]:
    return _names(recipes_dir())


_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[A-Za-z_][\w.\-/@]*)(?:=(?P<value>.*))?$", re.S)


def split_recipe(overrides: Sequence[str], default: str | None = DEFAULT_RECIPE) -> tuple[str | None, list[str]]:
    """Pull `recipe=NAME` out of the override list."""
    recipe, rest = default, []
    for o in overrides:
        if o.startswith("recipe="):
            recipe = o.split("=", 1)[1] or None
        else:
            rest.append(o)
    return recipe, rest


def _check_overrides(overrides: Sequence[str]) -> None:
    for o in overrides:
        if o.startswith("-"):
            raise GainError(f"unexpected option '{o}': configuration is set with key=value overrides (e.g. train.steps=10)")
        m = _OVERRIDE.match(o)
        if not m or m.group("value") is None and not m.group("prefix").startswith("~"):
            raise GainError(f"malformed override '{o}': expected key=value (e.g. method=lora or train.lr=1e-4)")
        key = m.group("key")
        if key in GROUPS and m.group("value") is not None and "," not in m.group("value"):
            value = m.group("value")
            choices = group_choices(key)
            if value not in choices:
                raise unknown_choice(key, value, choices)


def _friendly(exc: Exception, overrides: Sequence[str]) -> GainError:
    msg = str(exc).strip()
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        return GainError(f"unknown config key '{key}' (no such key in the composed config; use +{key}=VALUE to add a new key)")
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group, _, value = m.group(1).rpartition("/")
        return unknown_choice(group or "config", value, group_choices(group) if group else [])
    first = msg.splitlines()[0] if msg else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first += f": {str(cause).strip().splitlines()[0]}"
    return GainError(f"invalid configuration: {first}")


def _register_resolvers() -> None:
    """``${gain_pkg:data/x.jsonl}``: a file shipped inside the gain_cli package."""
    if not OmegaConf.has_resolver("gain_pkg"):
        OmegaConf.register_new_resolver("gain_pkg", lambda rel: str(_package_dir() / rel))


def compose_config(overrides: Sequence[str] = (), recipe: str | None = None) -> DictConfig:
    """Compose the base config, the recipe (if any) and the overrides into one resolved config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    overrides = list(overrides)
    _check_overrides(overrides)
    _register_resolvers()
    if recipe is not None and recipe not in recipe_choices():
        raise unknown_choice("recipe", recipe, recipe_choices())
    hydra_overrides = [f"hydra.searchpath=[file://{config_root()}]"]
    if recipe is not None:
        hydra_overrides.append(f"+recipes={recipe}")
    try:
        with initialize_config_dir(str(configs_dir()), version_base="1.3"):
            cfg = compose("config", overrides=hydra_overrides + overrides)
        cfg.recipe = recipe
        # expand ~ in the cache directory before it is interpolated into other paths
        cfg.cache_dir = str(Path(os.path.expanduser(str(cfg.cache_dir))).resolve())
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _friendly(exc, overrides) from exc
    validate_config(cfg)
    if cfg.domains.get("root"):
        cfg.domains.root = str(Path(os.path.expanduser(str(cfg.domains.root))))
    return cfg


# Types of the values that every run reads; checked right after composition so that a typo such as
# train.steps=1O is reported as one line instead of a crash deep inside training.
_INT, _NUM, _BOOL, _AUTO = "an integer", "a number", "true or false", "true, false or auto"
SCHEMA: dict[str, tuple[str, bool]] = {  # key -> (kind, may be null)
    "seed": (_INT, False), "resume": (_BOOL, False),
    "train.steps": (_INT, False), "train.batch_size": (_INT, False), "train.grad_accum": (_INT, False),
    "train.seq_len": (_INT, False), "train.warmup_ratio": (_NUM, False), "train.max_grad_norm": (_NUM, True),
    "train.log_every": (_INT, False), "train.threads": (_INT, True), "train.checkpoint_every": (_INT, True),
    "train.compile": (_AUTO, False), "eval.compile": (_AUTO, False), "train.drift_overlap": (_NUM, True),
    "eval.block_size": (_INT, False), "eval.max_blocks": (_INT, True), "eval.batch_size": (_INT, False),
    "method.lr": (_NUM, False), "method.weight_decay": (_NUM, True),
    "method.r": (_INT, False), "method.alpha": (_NUM, False), "method.dropout": (_NUM, False),  # LoRA-based methods
}
_POSITIVE = {"train.steps", "train.batch_size", "train.grad_accum", "train.seq_len", "eval.block_size",
             "eval.batch_size", "method.r"}
# ranges of the numbers above (checked when set; null where the schema allows it means "off" / "all")
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "method.lr": (lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "method.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "train.warmup_ratio": (lambda v: 0 <= v <= 1, "a fraction of the stage's steps in [0, 1]"),
    "train.max_grad_norm": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0, or null (no clipping)"),
    "train.checkpoint_every": (lambda v: v >= 0, "a number of steps >= 0 (0 or null: no mid-stage checkpoints)"),
    "train.log_every": (lambda v: v >= 1, "at least 1"),
    "eval.max_blocks": (lambda v: v >= 1, "at least 1, or null (every validation block)"),
    "method.alpha": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (LoRA's scale is alpha / r)"),
    "method.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "train.drift_overlap": (lambda v: 0 <= v <= 1, "a fraction of a segment in [0, 1] (each transition's length)"),
}


def validate_config(cfg: DictConfig) -> None:
    for key, (kind, nullable) in SCHEMA.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__" or (value is None and nullable):
            continue
        ok = {
            _INT: isinstance(value, int) and not isinstance(value, bool),
            _NUM: isinstance(value, (int, float)) and not isinstance(value, bool),
            _BOOL: isinstance(value, bool),
            _AUTO: isinstance(value, bool) or value == "auto",
        }[kind]
        if not ok:
            raise GainError(f"{key} must be {kind}, got {value!r}")
        if key in _POSITIVE and value < 1:
            raise GainError(f"{key} must be at least 1, got {value}")
        if key in RANGES and value is not None and not RANGES[key][0](value):
            raise GainError(f"{key} must be {RANGES[key][1]}, got {value!r}")
    _check_choices(cfg)


def _check_drift(cfg: DictConfig) -> None:
    """One-line refusals of a drift run that cannot work: a method that needs stage boundaries, sharded training."""
    from gain_cli.methods import boundary_free_methods, boundary_refusal
    from gain_cli.training.drift import SHARDING_REFUSAL

    method = OmegaConf.select(cfg, "method", default=None) or {}
    reason = boundary_refusal(method)
    if reason:
        raise GainError(f"train.domain_schedule=drift cannot run method '{method.get('name', method.get('kind'))}': "
                        f"{reason} (methods that run in it: {', '.join(boundary_free_methods())}; or use "
                        "train.domain_schedule=stages)")
    if str(OmegaConf.select(cfg, "train.sharding", default="none") or "none") in ("fsdp", "zero3"):
        raise GainError(SHARDING_REFUSAL)


def _check_choices(cfg: DictConfig) -> None:
    """Names a run would only look up later (the schedule, the domain sequence), checked now."""
    from gain_cli.training.optim import SCHEDULES

    schedule = OmegaConf.select(cfg, "train.schedule", default=None)
    if schedule is not None and schedule not in SCHEDULES:
        raise unknown_choice("train.schedule", schedule, SCHEDULES)
    from gain_cli.training.drift import DOMAIN_SCHEDULES

    domain_schedule = OmegaConf.select(cfg, "train.domain_schedule", default=None)
    if domain_schedule is not None and domain_schedule not in DOMAIN_SCHEDULES:
        raise unknown_choice("train.domain_schedule", domain_schedule, DOMAIN_SCHEDULES)
    if domain_schedule == "drift":  # a method that needs stage boundaries, sharded training: one line, before any run
        _check_drift(cfg)
    name = OmegaConf.select(cfg, "run_name", default=None)
    if name is not None and (str(name) in (".", "..") or "/" in str(name) or os.sep in str(name)):
        raise GainError(f"run_name '{name}' must be a plain name (no '/' and not '.' or '..'): it names a folder "
                        "under output_root/<recipe>/<method>; use run_dir=PATH for a run anywhere else")
    sequence = OmegaConf.select(cfg, "domains.sequence", default=None)
    if sequence is not None:
        names = [str(d) for d in sequence]
        if not names:
            raise GainError("domains.sequence is empty: a run adapts to at least one domain")
        repeated = sorted({d for d in names if names.count(d) > 1})
        if repeated:
            raise GainError(f"domains.sequence names {', '.join(repeated)} more than once: each domain is one stage "
                            "(its perplexity row would be ambiguous)")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


# settings that say where a run goes, how it is launched and how often it logs and checkpoints, not what it
# computes: a resumed run may change them
PLACEMENT_KEYS = ("run_dir", "run_name", "resume", "output_root", "launcher", "train.log_every", "train.log_with",
                  "train.checkpoint_every", "eval.harness.save_samples", "base_row", "study",
                  # compiled and eager runs agree within the tolerance the tests check (docs/performance.md)
                  "train.compile", "eval.compile")


def _results_part(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in PLACEMENT_KEYS:
        *parents, last = key.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    train = c.get("train")
    if isinstance(train, dict) and train.get("domain_schedule", "stages") in ("stages", None):
        # the default schedule hashes as a config written before the key existed (its runs still resume); the
        # drift settings do not change a staged run
        train.pop("domain_schedule", None)
        train.pop("drift_overlap", None)
    return c


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the results (not where they go)."""
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(_results_part(cfg))).encode()).hexdigest()[:16]


def config_differences(old: DictConfig, new: DictConfig) -> list[str]:
    """``key: old → new`` for every setting that determines the results and differs (dotted keys, sorted)."""

    def flat(node, prefix: str = "") -> dict[str, object]:
        if isinstance(node, dict):
            out: dict[str, object] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a, b = flat(_results_part(old)), flat(_results_part(new))
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)} → {b.get(k, missing)}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]
