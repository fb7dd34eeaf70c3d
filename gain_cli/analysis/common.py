"""Reopen a run: its config, base model, method, data; weights after any stage; losses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gain_cli.data.domains import DomainData, ensure_domains
from gain_cli.errors import GainError
from gain_cli.evaluation.perplexity import block_nll, evaluate_blocks
from gain_cli.io import atomic_write_json
from gain_cli.methods import build_method
from gain_cli.models.loading import load_model, model_spec
from gain_cli.reporting.figures import save_figure as save
from gain_cli.rundir import RunDir


@dataclass
class OpenRun:
    run_dir: Path
    cfg: Any
    model: Any
    tokenizer: Any
    method: Any
    data: Any
    domains: list[str]
    finished: list[int]

    @property
    def label(self) -> str:
        return str(self.cfg.method.name)

    def blocks(self, domain: str, max_blocks: int | None = None) -> torch.Tensor:
        mb = max_blocks if max_blocks is not None else self.cfg.eval.get("max_blocks")
        return self.data.blocks(domain, "validation", int(self.cfg.eval.block_size), mb)


def open_run(run_dir: str | Path) -> OpenRun:
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg = rd.require_run()
    model, tok = load_model(cfg.model, cfg.cache_dir)
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
    domains = ensure_domains(cfg.domains, cfg.cache_dir)
    return OpenRun(run_dir, cfg, model, tok, method, DomainData(domains, tok, cfg.cache_dir),
                   [d.name for d in domains], rd.finished_stages())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def weights_after(run: OpenRun, stages: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Floating-point weights of the base model (key 0) and after each requested stage (merged)."""
    if not run.method.mergeable:
        raise GainError(f"method '{run.method.name}' does not merge into plain weights; this analysis needs weights")
    missing = [k for k in stages if k and k not in run.finished]
    if missing:
        raise GainError(f"stage {missing[0]} of {run.run_dir} is not finished (finished: {run.finished})")
    rd = RunDir(run.run_dir)
    out = {0: snapshot(run.model)}
    model = run.model
    if rd.is_drift():  # each saved state is the whole run up to its segment, on the pretrained model
        for k in sorted(k for k in stages if k):
            load_weights(model, out[0])
            model = rd.apply_stage(model, run.method, k)
            out[k] = snapshot(model)
        run.model = model
        return out
    for k in range(1, max(stages, default=0) + 1):
        model = rd.apply_stage(model, run.method, k)  # full_ft: the stage's state is all weights
        if k in stages:
            out[k] = snapshot(model)
    run.model = model
    return out


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(weights, strict=False)


def mix_weights(base: dict[str, torch.Tensor], deltas: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """base + Σ coef · delta (each delta a dict of weight differences)."""
    out = {k: v.clone() for k, v in base.items()}
    for coef, delta in deltas:
        for k, d in delta.items():
            out[k] += coef * d
    return out


def delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """b − a over the weights that changed."""
    return {k: b[k] - a[k] for k in a if not torch.equal(a[k], b[k])}


def mean_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    return evaluate_blocks(model, blocks, batch_size).loss


@torch.inference_mode()
def token_losses(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    model.eval()
    return torch.cat([block_nll(model, blocks[i:i + batch_size]).flatten() for i in range(0, len(blocks), batch_size)])


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(fig, out_dir: Path, name: str, data) -> Path:
    """Write ``<name>.png`` (also as ``.svg`` and ``.pdf``: ``reporting.figures.save_figure``) and ``<name>.json``
    (the plotted numbers) atomically; return the PNG path."""
    png = save(fig, Path(out_dir) / f"{name}.png", dpi=120, bbox_inches=None)
    plt().close(fig)
    atomic_write_json(Path(out_dir) / f"{name}.json", data)
    return png
