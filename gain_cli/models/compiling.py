"""``torch.compile`` of the model's forward, for a training stage (``train.compile``) or a perplexity sweep
(``eval.compile``): ``true``, ``false`` or ``auto`` (the default: compile when the work ahead pays for it).

Compiling fuses the model's elementwise kernels (norms, rotary embeddings, activations, the loss) around the
matmuls; the maths is the same up to the order of floating-point reductions. It costs a one-off compile per
process (tens of seconds for a 135M model on CPU the first time; later processes with the same model and shapes
reuse inductor's on-disk cache and take seconds), so it pays for long stages and repeated sweeps, not for a
few steps — ``gain bench`` measures both the per-step speed-up and the one-off cost.

On CPU inductor writes and builds C++, so a C++ compiler and the Python headers must be installed; that is checked
up front (one line naming what is missing) instead of failing inside the first forward.

``auto`` (``decide_compile``) compiles when the time the compiled forward would save on the run's remaining work
is larger than what compiling costs:

    saved = work_seconds × (1 − 1 / SPEEDUP[kind])    >    compile_seconds = FIXED[kind] + PER_LAYER[kind] × layers

``work_seconds`` is the eager time of the training steps (or perplexity sweeps) still ahead, estimated from one
timed forward at the start of the run. The constants are ours, from ``gain bench`` on SmolLM2-135M (30 layers) on
this project's 2-core CPUs: compile costs from an empty inductor cache (first compile 53-74 s for training,
31-44 s for the sweep); speed-ups differ by machine (training steps 1.24-1.29× eager on an Intel Xeon with AMX,
1.07-1.10× on an AMD EPYC), so on CPU ``auto`` takes the lower one and compiles only long work (~15 min of
training ahead for SmolLM2). A warm on-disk cache compiles in seconds, so ``auto`` errs on the eager side; on
GPUs the constants are unmeasured (no GPU here), and ``true`` / ``false`` decide by hand.
Without a C++ toolchain on CPU ``auto`` stays eager (``true`` is an error there).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from dataclasses import dataclass
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


# compiled / eager speed of a step (train) or sweep (eval): on CPU the lower of the two machines measured (Xeon with
# AMX: 1.24-1.29× training; AMD EPYC: 1.07-1.10×); on GPUs unmeasured here (the Xeon's figure, a guess)
SPEEDUP = {"cpu": {"train": 1.08, "eval": 1.10}, "cuda": {"train": 1.25, "eval": 1.10}}
FIXED_SECONDS = {"train": 10.0, "eval": 5.0}  # compile cost = FIXED + PER_LAYER × decoder layers (cold cache)
PER_LAYER_SECONDS = {"train": 2.0, "eval": 1.2}


@dataclass(frozen=True)
class CompileDecision:
    enabled: bool
    reason: str

    def line(self, key: str) -> str:
        return f"{key}: {'compiled' if self.enabled else 'eager'} ({self.reason})"


def compile_seconds(kind: str, layers: int) -> float:
    """The estimated one-off cost of compiling a model of ``layers`` decoder layers for ``kind`` (train | eval)."""
    return FIXED_SECONDS[kind] + PER_LAYER_SECONDS[kind] * max(1, layers)


def decide_compile(setting, key: str, work_seconds: float | None, layers: int, device: torch.device | str,
                   refused: str | None = None) -> CompileDecision:
    """Whether ``key`` (``train.compile`` | ``eval.compile``) compiles: ``true`` / ``false`` as set (``true`` without
    a toolchain is the one-line error), ``auto`` by the pay-off rule of the module docstring. ``work_seconds``: the
    eager seconds of the work ahead (None: not measured, eager); ``refused``: why this run cannot compile at all
    (e.g. DeepSpeed ZeRO-3), which ``auto`` follows."""
    if setting is True:
        require_compile(device, key)
        return CompileDecision(True, f"{key}=true")
    if setting is False or setting is None:
        return CompileDecision(False, f"{key}=false")
    if refused:
        return CompileDecision(False, f"auto: {refused}")
    why = compile_unavailable(device)
    if why is not None:
        return CompileDecision(False, f"auto: torch.compile cannot build kernels here: {why}")
    if not work_seconds:
        return CompileDecision(False, "auto: no work ahead")
    kind = key.split(".")[0]
    speedup = SPEEDUP.get(torch.device(device).type, SPEEDUP["cuda"])[kind]
    saved, cost = work_seconds * (1 - 1 / speedup), compile_seconds(kind, layers)
    what = "training" if kind == "train" else "perplexity sweeps"
    if saved > cost:
        return CompileDecision(True, f"auto: ~{work_seconds:.0f} s of {what} ahead, compiling saves ~{saved:.0f} s "
                                     f"for a one-off ~{cost:.0f} s")
    return CompileDecision(False, f"auto: ~{work_seconds:.0f} s of {what} ahead would save ~{saved:.0f} s, less "
                                  f"than a ~{cost:.0f} s compile")
