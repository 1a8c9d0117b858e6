"""Training curves (one panel per stage, from each stage's ``metrics.jsonl``), and where in a
continuation the context helps (from an evaluation's ``eval.json``), and what the chunks hold as
text (from the read-out's ``readout.json``)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    _pyplot().close(fig)
    return out_png


def plot_training(run_dir: str | Path, out_png: str | Path, stages=None) -> Path:
    """``stages``: the panels, in order (default: every stage of the recipe)."""
    from .config import STAGES

    plt = _pyplot()
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
    return _save(fig, out_png)


def plot_content_by_position(result: dict, out_png: str | Path) -> Path:
    """Table 1 by continuation token: what each context gives over no context at every scored
    token (nats), for the window's own context and another window's, raw and compressed. The
    space between a solid line and its dashed control is that context's content.  ``result``: an
    ``eval.json`` whose rows hold ``per_position``."""
    from .evaluate import RAW_CONTROL, content_conditions

    plt = _pyplot()
    curves = {r["condition"]: r["per_position"] for r in result["rows"] if r.get("per_position")}
    treatment, control = content_conditions(curves)
    none = curves["No context"]
    tokens = range(1, len(none) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, color, style in (("Full context", "C0", "-"), (RAW_CONTROL, "C0", "--"),
                               (treatment, "C3", "-"), (control, "C3", "--")):
        ax.plot(tokens, [n - v for n, v in zip(none, curves[name])], style, color=color, lw=1.4, label=name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("continuation token (after the first, which every condition is given)")
    ax.set_ylabel("nats gained over no context")
    ax.set_title(f"{result['num_windows']} held-out windows, s={result['context_tokens']}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_readout(result: dict, out_png: str | Path) -> Path:
    """The read-out's content line as bars (nats per token, ± one standard error): what a window's
    own context gives over another window's as raw tokens, as its chunks read back out as text,
    and as compressed chunks.  ``result``: a ``readout.json``."""
    plt = _pyplot()
    bars = (("raw tokens", "raw", "C0"), ("read-out text", "read_out", "C2"), ("compressed chunks", "compressed", "C3"))
    content = result["content"]
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.bar([b[0] for b in bars], [content[b[1]]["mean"] for b in bars],
           yerr=[content[b[1]]["se"] for b in bars], color=[b[2] for b in bars], capsize=4)
    ax.set_ylabel("content, nats per token")
    ax.set_title(f"{result['num_windows']} held-out windows, s={result['context_tokens']}, k={result['k']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)
