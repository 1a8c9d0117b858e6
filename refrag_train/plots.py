"""Training curves: one panel per stage, from each stage's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training(run_dir: str | Path, out_png: str | Path, stages=None) -> Path:
    """``stages``: the panels, in order (default: every stage of the recipe)."""
    import matplotlib

    from .config import STAGES

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    present = [s for s in stages or STAGES if (run_dir / s / "metrics.jsonl").exists()]
    if not present:
        raise FileNotFoundError(f"{run_dir}: no stage metrics to plot")
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], present):
        rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        key = "reward" if stage == "policy" else "loss"
        # A stage with several sample groups (SFT with replay) logs each group's loss: plot those.
        # A group can be empty at a step (CPT's reconstruction samples are drawn at random):
        # each curve has the steps that logged it.
        keys = sorted({k for r in rows for k in r if k.startswith("loss_")}) or [key]
        for k in keys:
            steps = [r["step"] for r in rows if k in r]
            values = [r[k] for r in rows if k in r]
            raw, = ax.plot(steps, values, lw=0.8, alpha=0.5)
            window = max(1, len(values) // 15)
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=2, color=raw.get_color(), label=k[len("loss_"):] if k != key else None)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("reward (-log-PPL)" if key == "reward" else "loss (nats/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
