"""Adaptation methods. Importing this package registers every method kind.

Every module in this package (except the helpers below) is imported here, so a method is
added in one place: a module with a ``Method`` subclass registered by ``@register("kind")``
plus a YAML in ``configs/method/``.
"""

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from gain_cli.architectures import ArchSpec
from gain_cli.config_files import configs_dir
from gain_cli.errors import unknown_choice
from gain_cli.methods.base import METHOD_KINDS, PENALTIES, Method
from gain_cli.methods.penalties import Penalized, build_penalty

_HELPERS = {"base", "params", "penalties"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _HELPERS and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")



def method_class(cfg: Mapping[str, Any], strict: bool = True) -> type[Method] | None:
    """The class a method config names (``method.kind``, else ``method.name``); an unknown kind is one line
    (``strict``) or None."""
    kind = cfg.get("kind") or cfg.get("name")
    if kind not in METHOD_KINDS:
        if strict:
            raise unknown_choice("method kind", kind, METHOD_KINDS)
        return None
    return METHOD_KINDS[kind]


def build_method(cfg: Mapping[str, Any], spec: ArchSpec) -> Method:
    """The method ``cfg`` names, carrying ``method.penalty`` if set."""
    method = method_class(cfg)(cfg, spec)
    penalty = cfg.get("penalty")
    return Penalized(method, build_penalty(penalty, method)) if penalty else method


def boundary_refusal(method_cfg: Mapping[str, Any]) -> str | None:
    """Why the method a config names cannot train boundary-free (``train.domain_schedule=drift``): its kind's
    ``boundary_refusal``, else its penalty's; None when it can."""
    cls = method_class(method_cfg, strict=False)
    reason = getattr(cls, "boundary_refusal", None)
    penalty = method_cfg.get("penalty")
    if penalty and not reason:
        name = penalty.get("name") if isinstance(penalty, Mapping) else penalty
        reason = getattr(PENALTIES.get(str(name)), "boundary_refusal", None) or "its penalty needs stage boundaries"
    return reason


def boundary_free_methods() -> list[str]:
    """The shipped method configs (configs/method/*.yaml) that can train boundary-free."""
    from omegaconf import OmegaConf

    out = []
    for path in sorted((configs_dir() / "method").glob("*.yaml")):
        c = OmegaConf.load(path)
        if method_class(c, strict=False) is not None and not boundary_refusal(c):
            out.append(str(c.get("name", path.stem)))
    return out


__all__ = ["METHOD_KINDS", "Method", "boundary_free_methods", "boundary_refusal", "build_method", "method_class"]
