"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations

from collections.abc import Iterable


class GainError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


def unknown_choice(kind: str, value: object, choices: Iterable[str], hint: str = "") -> GainError:
    """`unknown method 'lorra' (valid: full_ft, gain_attn, ...)`."""
    valid = ", ".join(sorted(choices)) or "none"
    msg = f"unknown {kind} '{value}' (valid: {valid})"
    return GainError(msg + (f"; {hint}" if hint else ""))
