"""Optional ``torch.compile`` of the model's forward, for a training stage (``train.compile``) or a perplexity
sweep (``eval.compile``).

Compiling fuses the model's elementwise kernels (norms, rotary embeddings, activations, the loss) around the
matmuls; the maths is the same up to the order of floating-point reductions. It costs a one-off compile per
process (tens of seconds for a 135M model on CPU the first time; later processes with the same model and shapes
reuse inductor's on-disk cache and take seconds), so it pays for long stages and repeated sweeps, not for a
few steps — ``gain bench`` measures both the per-step speed-up and the one-off cost.

On CPU inductor writes and builds C++, so a C++ compiler and the Python headers must be installed; that is checked
up front (one line naming what is missing) instead of failing inside the first forward.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import torch

from gain_cli.errors import GainError


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here (None when it can)."""
    if torch.device(device).type != "cpu":
        return None  # GPU kernels are Triton's; nothing to check on the host
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
        return "no C++ compiler found (install g++ or set CXX)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"the Python headers are missing ({sysconfig.get_paths()['include']}/Python.h; install python3-dev)"
    return None


def require_compile(device: torch.device | str, key: str) -> None:
    """Raise the one-line error when ``key`` (e.g. ``train.compile``) is on but kernels cannot be built here."""
    why = compile_unavailable(device)
    if why is not None:
        raise GainError(f"{key}=true needs torch.compile's C++ toolchain on CPU: {why}; or set {key}=false")


def maybe_compile(module: torch.nn.Module, enabled: bool, device: torch.device | str, key: str):
    """``torch.compile(module)`` when ``enabled`` (``key`` names the config setting for the error), else ``module``.

    Dynamo's compiled code lives on the model class's forward, so the stages and sweeps of a run share it: its
    guards treat parameters as inputs and pass for the next stage's freshly attached method modules of the same
    structure (a 5-stage GAIN run compiles three graphs in all: evaluation before and after freezing, training).
    """
    if not enabled:
        return module
    require_compile(device, key)
    return torch.compile(module)
