"""Adaptation methods. Importing this package registers every method kind.

Every module in this package (except the helpers below) is imported here, so a method is
added in one place: a module with a ``Method`` subclass registered by ``@register("kind", config=ItsConfig)``
plus a YAML in ``configs/method/`` (docs/adding-a-method.md).
"""

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from gain_cli.architectures import ArchSpec
from gain_cli.config_files import configs_dir
from gain_cli.errors import unknown_choice
from gain_cli.methods.base import METHOD_KINDS, PENALTIES, Method, MethodConfig
from gain_cli.methods.penalties import Penalized, build_penalty
from gain_cli.schemas.typed import Section

_HELPERS = {"base", "params", "penalties"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _HELPERS and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")



def method_class(cfg: Mapping[str, Any] | MethodConfig, strict: bool = True) -> type[Method] | None:
    """The class a method config names (``method.kind``, else ``method.name``); an unknown kind is one line
    (``strict``) or None."""
    raw = cfg.to_dict() if isinstance(cfg, Section) else dict(cfg)  # the untyped mapping names its typed class
    kind = raw.get("kind") or raw.get("name")
    if kind not in METHOD_KINDS:
        if strict:
            raise unknown_choice("method kind", kind, METHOD_KINDS)
        return None
    return METHOD_KINDS[kind]


def method_config(cfg: Mapping[str, Any] | MethodConfig) -> MethodConfig:
    """The typed config of the method ``cfg`` names (its kind's config class: defaults filled in, values checked,
    one line on a bad or unknown key); ``method.name`` defaults to the kind."""
    return method_class(cfg).config.of(cfg)


def build_method(cfg: Mapping[str, Any] | MethodConfig, spec: ArchSpec) -> Method:
    """The method ``cfg`` names, carrying ``method.penalty`` if set."""
    typed = method_config(cfg)
    method = method_class(typed)(typed, spec)
    return Penalized(method, build_penalty(typed.penalty, method)) if typed.penalty else method


def boundary_refusal(method_cfg: Mapping[str, Any] | MethodConfig) -> str | None:
    """Why the method a config names cannot train boundary-free (``train.domain_schedule=drift``): its kind's
    ``boundary_refusal``, else its penalty's; None when it can."""
    cls = method_class(method_cfg, strict=False)
    reason = getattr(cls, "boundary_refusal", None)
    penalty = method_config(method_cfg).penalty if cls is not None else None
    if penalty and not reason:
        name = penalty.get("name") if isinstance(penalty, Mapping) else penalty
        reason = getattr(PENALTIES.get(str(name)), "boundary_refusal", None) or "its penalty needs stage boundaries"
    return reason


def boundary_free_methods() -> list[str]:
    """The shipped method configs (configs/method/*.yaml) that can train boundary-free."""
    out = []
    for path in sorted((configs_dir() / "method").glob("*.yaml")):
        c = OmegaConf.to_container(OmegaConf.load(path))
        c.pop("defaults", None)  # Hydra's defaults list (method_defaults/<kind>): method_config fills the same
        if method_class(c, strict=False) is not None and not boundary_refusal(c):
            out.append(method_config(c).name)
    return out


__all__ = ["METHOD_KINDS", "Method", "MethodConfig", "boundary_free_methods", "boundary_refusal", "build_method", "method_class", "method_config"]
