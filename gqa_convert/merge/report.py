"""A plot of a merge report: per layer, relative reconstruction error of K and V, method vs mean."""

from __future__ import annotations

import io
from pathlib import Path

from ..fileio import write_bytes_atomic


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
        ax.set_title(
            f"{side.upper()} heads"
            + (" (K mean-pooled: k_norm)" if side == "k" and "k_side" in report["summary"] else "")
        )
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative reconstruction error\n(calibration-weighted)")
    axes[1].legend()
    fig.suptitle(
        f"KV-head merge: {method} vs mean pooling ({report['summary']['calibration_tokens']} calibration tokens)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
