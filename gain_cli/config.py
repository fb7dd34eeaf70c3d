"""Hydra composition: `configs/` (groups model/ method/ domains/ train/ eval/) + `recipes/`.

Both directories ship inside the installed package (hatch force-include) and are used
from the source tree in an editable install. A recipe is a `# @package _global_` file
whose defaults override the groups; the command line beats the recipe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gain_cli.config_files import _package_dir, config_root, configs_dir, recipes_dir  # noqa: F401  (re-exported)
from gain_cli.errors import GainError, unknown_choice
from gain_cli.schemas import RunConfig
from gain_cli.schemas.run import composition_defaults

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


@functools.cache
def _store_defaults() -> None:
    """Hydra's ConfigStore entries the composition starts from: ``gain_defaults`` (every section's keys and
    defaults, first in configs/config.yaml) and ``method_defaults/<kind>`` (each method kind's, first in its YAMLs):
    every key exists before a group or an override sets it, and its default is written only in its section."""
    from hydra.core.config_store import ConfigStore

    # imports torch and every method: only once a config is composed (not on `gain --help`)
    from gain_cli.methods import METHOD_KINDS

    store = ConfigStore.instance()
    store.store(name="gain_defaults", node=composition_defaults())
    for kind, cls in METHOD_KINDS.items():
        store.store(group="method_defaults", name=kind, node={**cls.config.defaults(), "kind": kind})


def compose_config(overrides: Sequence[str] = (), recipe: str | None = None) -> DictConfig:
    """Compose the base config, the recipe (if any) and the overrides into one resolved config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    overrides = list(overrides)
    _check_overrides(overrides)
    _register_resolvers()
    _store_defaults()
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
    cfg = typed_config(cfg)
    if cfg.domains.root:
        cfg.domains.root = str(Path(os.path.expanduser(str(cfg.domains.root))))
    return cfg


def typed_config(cfg: DictConfig, method: bool = True) -> DictConfig:
    """The config checked against its sections (gain_cli/schemas; the method's own config class) and completed
    with their defaults: one line naming the key on a value of the wrong type, out of range or unknown. Without
    ``method`` the method section stays as it is (reading results needs neither torch nor the methods)."""
    run = RunConfig.of(cfg)
    data = run.to_dict()
    if not method:
        return OmegaConf.create(data)
    # imports torch and every method: only once a config is composed (not on `gain --help`)
    from gain_cli.methods import method_config

    data["method"] = method_config(run.method or {}).to_dict()
    typed = OmegaConf.create(data)
    _check_choices(typed)
    return typed


def load_saved_config(path: Path) -> DictConfig:
    """A run's saved ``config.yaml``, read through the sections like a composed one (the keys a later version
    added take their defaults); a config this version cannot read comes back as it was saved."""
    saved = OmegaConf.load(path)
    try:
        return typed_config(saved, method=False)  # the method's section is typed where a method is built
    except GainError:
        return saved


def _check_choices(cfg: DictConfig) -> None:
    """What a drift run cannot do (a method that needs stage boundaries, sharding), checked before any run."""
    from gain_cli.methods import boundary_free_methods, boundary_refusal
    from gain_cli.training.drift import SHARDING_REFUSAL

    if cfg.train.domain_schedule != "drift":
        return
    reason = boundary_refusal(cfg.method)  # a method that needs stage boundaries: one line, before any run
    if reason:
        raise GainError(f"train.domain_schedule=drift cannot run method '{cfg.method.name}': {reason} (methods that "
                        f"run in it: {', '.join(boundary_free_methods())}; or use train.domain_schedule=stages)")
    if cfg.train.sharding in ("fsdp", "zero3"):
        raise GainError(SHARDING_REFUSAL)


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
    """Hash of what determines the results (not where they go), over the config with its defaults filled in: a run
    saved before a key existed hashes as one that sets the key's default."""
    try:
        cfg = typed_config(cfg)
    except GainError:  # a config this version cannot read (it is compared as it was saved)
        pass
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
