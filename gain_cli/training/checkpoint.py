"""Mid-stage checkpoints: method state, optimiser, scheduler, fp16 loss scaler, RNG and data position.

Every ``train.checkpoint_every`` steps a complete checkpoint is written into a fresh folder
``stages/stage_K/ckpt-<step>/`` and only then the pointer ``stages/stage_K/checkpoint.json`` is
replaced atomically; older folders are removed afterwards. A reader follows the pointer, so a
kill at any moment leaves either the previous or the new checkpoint, never a half-written one.
Loading uses safetensors for the method state and ``torch.load(weights_only=True)`` for the rest; a sharded
run keeps its optimiser state sharded (torch.distributed.checkpoint, ``ckpt-<step>/optimizer/``).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from gain_cli import faults
from gain_cli.io import atomic_save_safetensors, atomic_write_json, atomic_write_with, read_json
from gain_cli.training.sharding import is_sharded, load_sharded_optimizer, save_sharded_optimizer

OPTIMIZER_DIR = "optimizer"  # sharded runs: the optimiser state, one file per process (torch.distributed.checkpoint)


class StageCheckpoints:
    def __init__(self, stage_dir: Path, every: int | None, is_main: bool = True):
        self.dir = Path(stage_dir)
        self.every = int(every) if every else 0
        self.is_main = is_main

    @property
    def pointer(self) -> Path:
        return self.dir / "checkpoint.json"

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, step: int, method, model, optimizer, scheduler, losses: list[float], tokens: int,
             scaler=None) -> None:
        """``scaler``: the fp16 loss scaler (GPU), whose scale and growth counter go into the checkpoint too.

        Sharded (FSDP): every process takes part (the method state is gathered, a collective) and writes its own
        shards of the optimiser state into ``ckpt-<step>/optimizer/`` (torch.distributed.checkpoint, whose
        coordinator, the main process, finishes only after every process has written); the main process
        writes the rest and then the pointer.
        """
        sharded = is_sharded(model)
        if not self.is_main and not sharded:
            return
        folder = self.dir / f"ckpt-{step}"
        method_state = method.state_dict(model)
        if sharded:
            save_sharded_optimizer(model, optimizer, folder / OPTIMIZER_DIR)
        if not self.is_main:
            return
        atomic_save_safetensors(folder / "method_state.safetensors", method_state)
        trainer = {
            "step": step, "losses": losses, "tokens": tokens,
            "optimizer": OPTIMIZER_DIR if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        atomic_write_with(folder / "trainer.pt", lambda p: torch.save(trainer, p))
        faults.point(f"ckpt{step}.before_pointer")
        atomic_write_json(self.pointer, {"step": step, "folder": folder.name})
        for old in self.dir.glob("ckpt-*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def saved_step(self) -> int | None:
        """The step of the checkpoint a resumed stage continues from (None: it starts from step 0)."""
        return int(read_json(self.pointer)["step"]) if self.pointer.is_file() else None

    def load(self) -> dict[str, Any] | None:
        if not self.pointer.is_file():
            return None
        from safetensors.torch import load_file

        folder = self.dir / read_json(self.pointer)["folder"]
        self.loaded_folder = folder
        trainer = torch.load(folder / "trainer.pt", weights_only=True)
        trainer["method_state"] = load_file(str(folder / "method_state.safetensors"))
        return trainer

    def load_optimizer(self, model, optimizer) -> None:
        """The sharded optimiser state of the checkpoint that ``load`` read (every process reads its shards)."""
        load_sharded_optimizer(model, optimizer, self.loaded_folder / OPTIMIZER_DIR)

    @staticmethod
    def restore_rng(trainer: dict[str, Any]) -> None:
        torch.set_rng_state(trainer["torch_rng"])
        state = random.getstate()
        random.setstate((state[0], tuple(trainer["python_rng"]), state[2]))

    def clear(self) -> None:
        if self.is_main:
            self.pointer.unlink(missing_ok=True)
            for old in self.dir.glob("ckpt-*"):
                shutil.rmtree(old, ignore_errors=True)
