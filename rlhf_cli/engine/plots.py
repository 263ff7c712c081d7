"""PNG curves of a run's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

_SKIP = {"step", "epoch", "split"}


def plot_run(run_dir: Path, out_name: str = "training_curves.png") -> Path | None:
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") != "eval"]
    evals = [r for r in rows if r.get("split") == "eval"]
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in _SKIP and isinstance(v, (int, float))})
    # Loss first, then the rest alphabetically.
    keys = sorted(keys, key=lambda k: (k != "loss", k))
    cols = 3
    nrows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for series, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
            points = [(r["step"], r[key]) for r in series if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
