"""Per-round plots: accuracy (the organization's dashboard, the demo, the benchmarks) and the cost
of a round (benchmarks/vs_flower.py)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display here; render straight to PNG
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def accuracy_png(curves: Mapping[str, Sequence[tuple[int, float]]], title: str,
                 path: Path | None = None, baseline: tuple[str, float] | None = None) -> bytes:
    """Plot one line per curve of (round, accuracy) points, on an axis from 0 to 100 % so that a
    gain looks its size; `baseline` (label, accuracy) is drawn dashed. Written to `path` if given;
    returns the PNG bytes."""
    return _metric_png(curves, title, "accuracy (%)", path, baseline, scale=100.0, top=100.0)


def error_png(curves: Mapping[str, Sequence[tuple[int, float]]], title: str, metric: str,
              baseline: tuple[str, float] | None = None) -> bytes:
    """Plot one line per curve of (round, error) points of a numeric label (`metric`: its RMSE, in
    the label's units) on an axis from 0; `baseline` (label, error) is drawn dashed."""
    return _metric_png(curves, title, metric, None, baseline)


def _metric_png(curves: Mapping[str, Sequence[tuple[int, float]]], title: str, ylabel: str, path: Path | None,
                baseline: tuple[str, float] | None, scale: float = 1.0, top: float | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if baseline is not None:
        ax.axhline(scale * baseline[1], color="grey", linestyle="--", label=f"baseline: {baseline[0]}")
    _plot_rounds(ax, {label: [(r, scale * value) for r, value in points] for label, points in curves.items()},
                 "round (0 = initial model)", ylabel)
    ax.set_ylim(0, top)
    if baseline is not None:
        ax.legend()
    ax.set_title(title)
    return _png(fig, path)


def round_cost_png(runs: Mapping[str, Mapping[str, Sequence[float]]], title: str, path: Path | None = None,
                   first_round: int = 2) -> bytes:
    """Wall seconds and the machine's CPU-seconds per round, one line per run, from `first_round` on
    (the first round carries start-up costs). Each run holds "seconds_per_round" and
    "cpu_seconds_per_round"; written to `path` if given; returns PNG bytes."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    for ax, figure, ylabel in zip(axes, ("seconds_per_round", "cpu_seconds_per_round"),
                                  ("wall seconds per round", "CPU-seconds per round (all processes)")):
        _plot_rounds(ax, {label: list(enumerate(run[figure], start=1))[first_round - 1:]
                          for label, run in runs.items()}, "round", ylabel)
        ax.set_ylim(bottom=0)
    fig.suptitle(title)
    return _png(fig, path)


def _plot_rounds(ax, curves: Mapping[str, Sequence[tuple[int, float]]], xlabel: str, ylabel: str) -> None:
    for label, points in curves.items():
        if points:
            rounds, values = zip(*points)
            ax.plot(rounds, values, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()


def _png(fig, path: Path | None) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
