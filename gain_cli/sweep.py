"""Hydra-style multirun for `gain run -m`: `method=lora,gain_ffn method.lr=1e-4,3e-4` → 4 runs.

Comma lists (and Hydra sweep functions such as range()) are expanded with Hydra's own override
parser into their Cartesian product; each combination becomes one ordinary run whose run_name
names its swept values, so a sweep's runs sit side by side and can be compared with
`gain report pareto`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from gain_cli.errors import GainError


def expand_sweep(overrides: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(run_name_suffix, overrides)] for every combination of the sweep overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise GainError(f"cannot parse the sweep overrides: {str(exc).splitlines()[0]}") from exc
    fixed, axes = [], []
    for o, text in zip(parsed, overrides):
        if o.is_sweep_override():
            key = text.split("=", 1)[0]
            axes.append([(key, v) for v in o.sweep_string_iterator()])
        else:
            fixed.append(text)
    if not axes:
        return [("", list(overrides))]
    out = []
    for combo in itertools.product(*axes):
        name = "_".join(f"{k.lstrip('+~').split('.')[-1]}-{v}" for k, v in combo)
        out.append((re.sub(r"[^\w.\-]+", "", name), fixed + [f"{k}={v}" for k, v in combo]))
    return out
