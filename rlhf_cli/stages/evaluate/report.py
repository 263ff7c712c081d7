"""The human side of `rlhf eval`: PNG plots and a short Markdown report."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def calibration_bins(chosen: list[float], rejected: list[float], bins: int = 10):
    """(predicted P(chosen), observed accuracy, count) per bin of σ(margin)."""
    rows = [(1 / (1 + math.exp(-(c - r))), c > r) for c, r in zip(chosen, rejected, strict=True)]
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [hit for p, hit in rows if low <= p < high or (b == bins - 1 and p == 1.0)]
        inside = [p for p, _ in rows if low <= p < high or (b == bins - 1 and p == 1.0)]
        if members:
            out.append((sum(inside) / len(inside), sum(members) / len(members), len(members)))
    return out


def write_plots(out: Path, chosen: list[float], rejected: list[float], kind: str) -> list[Path]:
    plt = _pyplot()
    label = "reward" if kind == "reward_model" else "implicit reward β·log π/π_ref"
    fig, (hist, calib) = plt.subplots(1, 2, figsize=(10, 3.8))
    hist.hist(chosen, bins=30, alpha=0.6, label="chosen")
    hist.hist(rejected, bins=30, alpha=0.6, label="rejected")
    hist.set_xlabel(label)
    hist.set_title("scores of held-out pairs")
    hist.legend()
    points = calibration_bins(chosen, rejected)
    if points:
        xs, ys, counts = zip(*points, strict=True)
        calib.plot([0, 1], [0, 1], ":", color="grey")
        calib.scatter(xs, ys, s=[10 + 2 * c for c in counts])
    calib.set_xlabel("predicted P(chosen) = σ(margin)")
    calib.set_ylabel("observed accuracy")
    calib.set_title("calibration")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def write_markdown(path: Path, report: dict, plots: list[Path]) -> None:
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"Data: `{report['data']}` — {report['num_pairs']} pairs "
             f"({report.get('skipped', 0)} skipped). Model kind: {report['kind']}.", "",
             "| metric | value |", "|---|---|"]
    for key in ("accuracy", "mean_margin", "chosen_mean", "chosen_std", "rejected_mean",
                "rejected_std", "beta"):
        if key in report:
            lines.append(f"| {key} | {report[key]:.4f} |")
    for key, value in (report.get("generation") or {}).items():
        if isinstance(value, int):
            lines.append(f"| generation/{key} | {value} |")
        elif isinstance(value, float):
            lines.append(f"| generation/{key} | {value:.4f} |")
    definition = (report.get("generation") or {}).get("kl_definition")
    if definition:
        lines += ["", f"generation/kl: {definition}."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(lines))
