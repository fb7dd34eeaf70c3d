"""Ctrl-C, remembered. A library can turn the KeyboardInterrupt into another error on its way up (transformers'
lazy imports re-raise an interrupt that lands inside an import as ``ModuleNotFoundError``); the run must still
read as interrupted (exit 130, ``run_info.json`` status ``interrupted``), not as failed with a puzzling message."""

from __future__ import annotations

import signal

_received = False


def _on_sigint(signum, frame) -> None:
    global _received
    _received = True
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as before


def install() -> None:
    """Remember every Ctrl-C from now on; only where Python's own handler is in place (a background job that
    ignores SIGINT keeps ignoring it)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def received(exc: BaseException | None = None) -> bool:
    """Whether the process was interrupted: ``exc`` is a KeyboardInterrupt, or a Ctrl-C came before it."""
    return _received or isinstance(exc, KeyboardInterrupt)
