"""Fault injection for the reliability tests.

``GAIN_FAULT_KILL_AT=<point>`` (e.g. ``stage2.step5``, ``eval.stage_1.code``, ``write:ppl_matrix.json``)
makes the process kill itself there with SIGKILL, as a power cut would.
``GAIN_FAULT_NAN_AT=stage<K>.step<N>`` turns that step's loss into NaN. Unset, both are no-ops.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("GAIN_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(name: str, loss):
    """Return NaN instead of ``loss`` at the named step (GAIN_FAULT_NAN_AT)."""
    if os.environ.get("GAIN_FAULT_NAN_AT") == name:
        return loss * float("nan")
    return loss
