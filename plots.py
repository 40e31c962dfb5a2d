"""Accuracy-per-round plots, shared by the organization's dashboard, the demo and the benchmarks."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display here; render straight to PNG
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def accuracy_png(curves: Mapping[str, Sequence[tuple[int, float]]], title: str,
                 path: Path | None = None) -> bytes:
    """Plot one line per curve of (round, accuracy) points; write to `path` if given; return PNG bytes."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, points in curves.items():
        if points:
            rounds, accuracy = zip(*points)
            ax.plot(rounds, [100 * a for a in accuracy], marker="o", label=label)
    ax.set_xlabel("round (0 = initial model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
