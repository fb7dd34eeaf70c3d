"""Fault injection for the reliability tests: die with SIGKILL at a named point.

``GAIN_FAULT_KILL_AT=<point>`` (e.g. ``stage2.step5``, ``stage3.eval``, ``write:ppl_matrix.json``)
makes the process kill itself there, as a power cut would. Unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("GAIN_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
