"""Figure 4: combining two adaptations, θ(α, β) = θ0 + α·Δ_a + β·Δ_b.

Δ_a = θ_a − θ_{a−1} and Δ_b = θ_b − θ_{b−1} are the weight changes made by two stages of one run
(e.g. WikiText and Medical; for GAIN these are the merged gains' effect on the weights). On a grid
of (α, β) the loss is measured on both stages' domains and, cross-domain, on every other domain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gain_cli.analysis.common import (
    delta, load_weights, mean_loss, mix_weights, open_run, plt, save_figure, weights_after,
)
from gain_cli.errors import GainError


def combination(run_dir: Path, out_dir: Path, stages: tuple[int, int] = (1, 2), grid: list[float] | None = None,
                max_blocks: int | None = None) -> Path:
    a, b = stages
    if a == b or min(a, b) < 1:
        raise GainError(f"--stages needs two different stages ≥ 1, got {a} and {b}")
    grid = grid or [0.0, 0.5, 1.0, 1.5]
    run = open_run(run_dir)
    need = sorted({a - 1, a, b - 1, b})
    w = weights_after(run, need)
    da, db = delta(w[a - 1], w[a]), delta(w[b - 1], w[b])
    dom_a, dom_b = run.domains[a - 1], run.domains[b - 1]
    others = [x for x in run.domains if x not in (dom_a, dom_b)]
    blocks = {x: run.blocks(x, max_blocks) for x in run.domains}
    shape = (len(grid), len(grid))
    loss_a, loss_b, cross = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for i, alpha in enumerate(grid):
        for j, beta in enumerate(grid):
            load_weights(run.model, mix_weights(w[0], [(alpha, da), (beta, db)]))
            loss_a[i, j] = mean_loss(run.model, blocks[dom_a])
            loss_b[i, j] = mean_loss(run.model, blocks[dom_b])
            cross[i, j] = np.mean([mean_loss(run.model, blocks[x]) for x in others]) if others else np.nan
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(12, 3.8))
    for ax, mat, title in zip(axes, (loss_a, loss_b, cross), (dom_a, dom_b, "other domains (mean)")):
        im = ax.imshow(mat, origin="lower", cmap="viridis")
        ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
        ax.set_yticks(range(len(grid)), [f"{g:g}" for g in grid])
        ax.set_xlabel(f"β (stage {b}: {dom_b})")
        ax.set_ylabel(f"α (stage {a}: {dom_a})")
        ax.set_title(f"loss on {title}")
        for i in range(len(grid)):
            for j in range(len(grid)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{run.label}: θ0 + α·Δ{a} + β·Δ{b}")
    fig.tight_layout()
    return save_figure(fig, out_dir, "combination", {
        "run": str(run_dir), "method": run.label, "stages": [a, b], "domains": [dom_a, dom_b], "grid": grid,
        "loss_a": loss_a.tolist(), "loss_b": loss_b.tolist(), "cross_domain_loss": cross.tolist(), "other_domains": others})
