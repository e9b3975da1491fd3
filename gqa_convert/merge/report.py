"""A plot of a merge report: per layer, relative reconstruction error of K and V, method vs mean."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plot_report(report: dict, path: Path) -> Path:
    """Write the PNG (atomically: a temp file beside it, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    method = report["summary"]["method"]
    layers = sorted(k for k in report if isinstance(k, int))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, side in zip(axes, ("k", "v")):
        for label, style in (("mean", "o--"), (method, "s-")):
            vals = [report[i][side][label] for i in layers]
            ax.plot(layers, vals, style, label=label)
            if label == method == "mean":
                break
        ax.set_title(f"{side.upper()} heads" + (" (K mean-pooled: k_norm)" if side == "k" and "k_side" in report["summary"] else ""))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative reconstruction error\n(calibration-weighted)")
    axes[1].legend()
    fig.suptitle(f"KV-head merge: {method} vs mean pooling ({report['summary']['calibration_tokens']} calibration tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.stem}-", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
