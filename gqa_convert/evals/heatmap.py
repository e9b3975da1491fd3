"""The length x depth heat map of passkey accuracy, one panel per model, as a PNG.

Rendered with matplotlib's Agg canvas directly (no pyplot: no global backend switch, no figure
left open in a long-running process) and written beside the target, then renamed into place, so
a reader never sees half a file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Optional, Union

from ..errors import ConfigError
from ..fileio import write_bytes_atomic
from .passkey import PasskeyResult

Results = Union[PasskeyResult, Mapping[str, PasskeyResult]]


def _panels(results: Results) -> list[tuple[str, PasskeyResult]]:
    if isinstance(results, PasskeyResult):
        return [("", results)]
    panels = list(results.items())
    if not panels or not all(isinstance(r, PasskeyResult) for _, r in panels):
        raise ConfigError("plot_passkey_heatmap needs a PasskeyResult or a {label: PasskeyResult} mapping")
    return panels


def _draw(ax, label: str, result: PasskeyResult, cmap: str):
    grid = result.grid()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_yticks(range(len(result.lengths)), [str(L) for L in result.lengths])
    ax.set_xlabel("needle depth")
    ax.set_title(f"{label}  (mean {result.overall:.0%})" if label else f"mean {result.overall:.0%}")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            # dark text on the light end of the map, light text on the dark end
            ax.text(
                col,
                row,
                f"{value:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if value > 0.5 else "white",
            )
    return image


def plot_passkey_heatmap(
    results: Results,
    path: Union[str, Path],
    *,
    title: Optional[str] = None,
    cmap: str = "viridis",
) -> Path:
    """Write a PNG heat map of accuracy (rows: length in tokens, columns: needle depth).

    Args:
        results: one PasskeyResult, or {label: result} for panels side by side (e.g. source and
            converted); every panel shares the 0-100 % colour scale.
        path: the PNG to write (its folder must exist).
        title: a title over all panels.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(results)
    height = 1.2 + 0.45 * max(len(r.lengths) for _, r in panels)
    fig = Figure(figsize=(0.5 + 3.6 * len(panels), max(2.6, height)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, result) in zip(axes, panels):
        image = _draw(ax, label, result, cmap)
    assert image is not None  # _panels gives at least one panel
    axes[0].set_ylabel("length (tokens)")
    fig.colorbar(image, ax=list(axes), label="passkey accuracy", format=lambda v, _: f"{v:.0%}")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return write_bytes_atomic(Path(path), buf.getvalue())
