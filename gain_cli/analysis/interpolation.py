"""Figure 3: loss along the straight line from the base weights θ0 to the adapted weights θK.

θ(α) = θ0 + α (θK − θ0) for α in [0, alpha_max]; in-domain loss is on stage K's own domain,
cross-domain loss is the token-weighted mean over every other domain of the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gain_cli.analysis.common import (
    delta, load_weights, mean_loss, mix_weights, open_run, plt, save_figure, weights_after,
)


def interpolation(run_dirs: list[Path], out_dir: Path, stage: int = 1, points: int = 11, alpha_max: float = 1.0,
                  max_blocks: int | None = None) -> Path:
    out_dir = Path(out_dir)
    alphas = np.linspace(0.0, alpha_max, points)
    curves = []
    for rd in run_dirs:
        run = open_run(rd)
        w = weights_after(run, [stage])
        d = delta(w[0], w[stage])
        own = run.domains[stage - 1]
        others = [x for x in run.domains if x != own]
        blocks = {x: run.blocks(x, max_blocks) for x in run.domains}
        ins, cross = [], []
        for a in alphas:
            load_weights(run.model, mix_weights(w[0], [(float(a), d)]))
            ins.append(mean_loss(run.model, blocks[own]))
            cross.append(float(np.mean([mean_loss(run.model, blocks[x]) for x in others])))
        curves.append({"run": str(rd), "method": run.label, "stage": stage, "domain": own,
                       "alpha": alphas.tolist(), "in_domain_loss": ins, "cross_domain_loss": cross})
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for c in curves:
        axes[0].plot(c["alpha"], c["in_domain_loss"], marker="o", markersize=3, label=c["method"])
        axes[1].plot(c["alpha"], c["cross_domain_loss"], marker="o", markersize=3, label=c["method"])
    axes[0].set_title(f"in-domain ({curves[0]['domain']})")
    axes[1].set_title("cross-domain (mean of the other domains)")
    for ax in axes:
        ax.set_xlabel("α  (θ0 + α·(θK − θ0))")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir, "interpolation", curves)
