"""Adaptation methods. Importing this package registers every method kind.

Every module in this package (except the helpers below) is imported here, so a method is
added in one place: a module with a ``Method`` subclass registered by ``@register("kind")``
plus a YAML in ``configs/method/``.
"""

import importlib
import pkgutil

from gain_cli.methods.base import METHOD_KINDS, Method, build_method

_HELPERS = {"base", "params"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _HELPERS and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["METHOD_KINDS", "Method", "build_method"]
