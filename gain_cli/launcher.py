"""Re-executing `gain run` through `accelerate launch` (config group ``launcher``).

``gain run ... launcher.num_processes=N`` (or ``launcher=accelerate_cpu2|gpu8|multinode``) turns the
``gain`` process into a thin parent: it builds one ``accelerate launch`` command that runs the same
``gain run`` arguments in N worker processes, waits for it and exits with its exit code. The
workers find ``WORLD_SIZE`` (and ``GAIN_LAUNCHED``) in their environment and never relaunch.
Launching by hand (``accelerate launch ... -m gain_cli run ...`` or ``torchrun``) works the same
way: every process then simply runs.

Keys (``configs/launcher/*.yaml``)::

    num_processes      processes in total, over all machines (1 = no relaunch, run in this process)
    num_machines       machines (1 = this one); machine_rank: this machine's index (0 = main)
    main_process_ip    address of machine 0 (several machines only)
    main_process_port  rendezvous port; null = a free port on one machine, 29500 on several
    accelerate_config  an Accelerate config file: a name under configs/accelerate/ (ddp, fsdp,
                       deepspeed_zero3) or a path; null = plain DDP from flags alone. A config of
                       distributed_type FSDP means train.sharding=fsdp (DEEPSPEED with zero_stage 3:
                       train.sharding=zero3): gain shards the model itself and launches plain processes
                       (no --config_file)
    cpu                true = CPU processes with gloo (ACCELERATE_USE_CPU=1 + --multi_gpu)

Pitfalls (Accelerate 1.x, all seen here):

* ``accelerate launch --cpu --num_processes 2`` silently runs ONE process (``--cpu`` selects the
  simple launcher, which ignores ``--num_processes``). Two gloo ranks on CPU come from
  ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (or ``ACCELERATE_USE_CPU=1
  torchrun --standalone --nproc_per_node 2``: plain torchrun on CPU gives two gloo-less processes that
  Accelerate each counts as 1 of 1); ``launcher.cpu=true`` builds the accelerate form.
* ``--multi_gpu`` without the CPU switch on a machine without enough GPUs starts N processes that
  each believe they are rank 0 of 1, with no error: each would train on all the data and write the
  same files. Every run therefore checks at start that Accelerate's process count equals
  ``WORLD_SIZE`` and refuses otherwise (``gain_cli.training.accelerator.make_accelerator``).
* Without ``--config_file``, ``accelerate launch`` reads the user's default config
  (``~/.cache/huggingface/accelerate/default_config.yaml``) if there is one, which can change the
  distributed type, mixed precision or machine count behind the run's back. The launcher passes
  every setting it relies on as a flag (``--num_processes``, ``--num_machines``,
  ``--mixed_precision`` from ``train.mixed_precision``, ...), and flags beat the file.
* Some launch paths set no ``WORLD_SIZE`` (Accelerate's simple launcher, used for one process or a
  config of type ``NO``); the parent also sets ``GAIN_LAUNCHED=1`` so a worker can never relaunch
  itself in a loop. One process (num_processes=1) is never relaunched, whatever accelerate_config says.
* All processes must use one run directory, but the default one is a timestamp computed per
  process (and per machine). The parent resolves it once and passes ``run_dir=...`` to the
  workers; with several machines it insists on ``run_dir`` or ``run_name`` (on a file system every
  machine sees).
* ``train.batch_size`` is per process: one optimiser step sees batch_size × grad_accum ×
  num_processes sequences. Halve batch_size when doubling the processes to keep the results.
* The default rendezvous port 29500 is shared by every launch on the machine; two concurrent
  single-machine runs would collide, so a free port is picked when none is configured.
* A worker that fails with a gain error exits with code 2, but torch's elastic agent reports a
  failed worker as exit code 1 (after its own summary); the parent passes that code on.
* Only the main process (rank 0) writes files and runs lm-eval; Ctrl-C reaches every process of
  the terminal's process group, so the parent just waits for the launcher and returns 130.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gain_cli.accelerate_configs import resolve_accelerate_config, sharding_of
from gain_cli.errors import GainError
from gain_cli.schemas.run import LauncherConfig, group_of

LAUNCHED_ENV = "GAIN_LAUNCHED"
DEFAULT_PORT = 29500
_HYDRA_SAFE = re.compile(r"^[A-Za-z0-9_/.\-+@%~]+$")


def launcher_settings(cfg) -> LauncherConfig:
    """The ``launcher`` section of a config, checked, with defaults filled in (a config without one = local)."""
    return group_of(cfg, "launcher")


def inside_launch() -> bool:
    """True in a process started by accelerate launch / torchrun (or by this launcher)."""
    return "WORLD_SIZE" in os.environ or os.environ.get(LAUNCHED_ENV) == "1"


def needs_launch(settings: LauncherConfig) -> bool:
    """More than one process asked for, and not already inside a launched process."""
    return (settings.num_processes > 1 or settings.num_machines > 1) and not inside_launch()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hydra_value(text: str) -> str:
    """Quote a value for a Hydra override when it holds characters the override grammar treats specially."""
    if _HYDRA_SAFE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _has_override(argv: Sequence[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+~") == key for a in argv if "=" in a)


def build_launch_command(cfg, argv: Sequence[str], run_dir: str | Path | None = None,
                         port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command (and environment) that re-runs ``gain <argv>`` in the configured processes.

    ``argv`` is what followed the program name (e.g. ``["run", "recipe=tiny_8domains", ...]``); ``run_dir``, when
    given and not already among the overrides, is appended as ``run_dir=...`` so every process uses it.
    """
    st = launcher_settings(cfg)
    n = st.num_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    config_file = resolve_accelerate_config(st.accelerate_config) if st.accelerate_config else None
    if config_file is not None:
        if sharding_of(str(config_file)) in ("fsdp", "zero3"):
            # gain shards the model itself (gain_cli.training.sharding: train.sharding=fsdp|zero3, which this
            # config implies): Accelerate launches plain processes (on CPU it would silently drop its FSDP plugin
            # and refuse DeepSpeed)
            config_file = None
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if n > 1 and (st.cpu or config_file is None):
        # CPU: --multi_gpu + ACCELERATE_USE_CPU=1 gives N gloo ranks (never --cpu: it runs one process);
        # GPU without a config file: plain DDP.
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(n), "--num_machines", str(st.num_machines)]
    if st.num_machines > 1:
        if not st.main_process_ip:
            raise GainError("several machines need launcher.main_process_ip (the address of machine 0)")
        cmd += ["--machine_rank", str(st.machine_rank), "--main_process_ip", str(st.main_process_ip)]
    if port is None:
        port = st.main_process_port
    if port is None:
        port = DEFAULT_PORT if st.num_machines > 1 else free_port()
    cmd += ["--main_process_port", str(int(port))]
    cmd += ["--mixed_precision", group_of(cfg, "train").mixed_precision, "--dynamo_backend", "no"]
    cmd += ["-m", "gain_cli", *argv]
    if run_dir is not None and not _has_override(argv, "run_dir"):
        cmd.append(f"run_dir={hydra_value(str(run_dir))}")
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    if st.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def local_gpus() -> int:
    """CUDA (or XPU) devices this machine has."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.device_count() + (xpu.device_count() if xpu is not None and xpu.is_available() else 0)


def check_gpus_for(settings: LauncherConfig) -> None:
    """GPU processes (``launcher.cpu=false``) need a GPU each on this machine; refuse before starting any (they
    would each fail with Accelerate seeing one process, under a launcher traceback)."""
    if settings.cpu:
        return
    per_machine = settings.num_processes // settings.num_machines
    have = local_gpus()
    if have < per_machine:
        fix = (f"launcher.num_processes={have * settings.num_machines}" if have else
               "one process (launcher=local) or CPU processes (launcher=accelerate_cpu2, or launcher.cpu=true)")
        raise GainError(f"the launcher starts {per_machine} GPU process(es) on this machine, one per GPU, but it has "
                        f"{have or 'no'} GPU{'s' if have != 1 else ''}: use {fix}")


def maybe_relaunch(cfg, argv: Sequence[str], console=None) -> int | None:
    """Re-run ``gain <argv>`` through accelerate launch when the launcher config asks for it.

    Returns None when this process should go on and run (one process, or already inside a launched
    process), otherwise the exit code of the launched run (after waiting for it).
    """
    st = launcher_settings(cfg)
    if not needs_launch(st):
        return None
    if st.num_machines > 1 and not (cfg.run_dir or cfg.run_name):
        raise GainError("a run over several machines needs run_name=NAME or run_dir=PATH (on a file system every "
                        "machine sees): the default, timestamped run directory would differ between machines")
    from gain_cli.rundir import resolve_run_dir
    from gain_cli.training.sharding import requested_sharding

    requested_sharding(cfg)  # train.sharding / a DeepSpeed config refused before starting N processes
    check_gpus_for(st)
    cmd, env = build_launch_command(cfg, argv, resolve_run_dir(cfg))
    if console is not None:
        console.print(f"launching {st.num_processes} process(es) on {st.num_machines} machine(s)"
                      f"{' (CPU, gloo)' if st.cpu else ''}: accelerate launch {' '.join(cmd[3:])}",
                      highlight=False, markup=False)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached the launcher and the workers too; give them time to stop.
        try:
            return proc.wait(timeout=60) or 130
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            return 130
