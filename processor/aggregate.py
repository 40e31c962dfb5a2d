"""Aggregation of client deltas: small pure NumPy functions, apart from any orchestration.

`Weights` maps a tensor's name to its array. FedAvg is streaming (a running weighted sum, one
delta in memory at a time); median and trimmed mean need every delta at once by nature.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Weights = dict[str, np.ndarray]


def l2_norm(tensors: Weights) -> float:
    """The L2 norm of all tensors taken as one flat vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values())))


def clip_by_norm(delta: Weights, max_norm: float) -> Weights:
    """`delta` scaled down to L2 norm `max_norm` when it is longer; unchanged otherwise."""
    norm = l2_norm(delta)
    if norm <= max_norm or norm == 0.0:
        return delta
    scale = max_norm / norm
    return {name: (t * scale).astype(t.dtype) for name, t in delta.items()}


def weighted_mean(deltas: Iterable[tuple[Weights, int]]) -> Weights:
    """FedAvg: the mean of the deltas weighted by their sample counts, in one streaming pass.

    Accumulates in float64, so the order of the deltas does not change the result measurably.
    """
    total: dict[str, np.ndarray] | None = None
    samples = 0
    for delta, num_samples in deltas:
        if num_samples <= 0:
            raise ValueError(f"a delta must come with a positive sample count, got {num_samples}")
        if total is None:
            total = {name: np.zeros(t.shape, np.float64) for name, t in delta.items()}
        for name, t in delta.items():
            total[name] += t * float(num_samples)  # in place: no second model-sized buffer
        samples += num_samples
    if total is None:
        raise ValueError("no deltas to aggregate")
    return {name: (t / samples).astype(np.float32) for name, t in total.items()}


def _stack(deltas: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([d[name] for d in deltas])


def coordinate_median(deltas: Sequence[Weights]) -> Weights:
    """The coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary deltas."""
    if not deltas:
        raise ValueError("no deltas to aggregate")
    return {name: np.median(_stack(deltas, name), axis=0).astype(np.float32) for name in deltas[0]}


def trimmed_mean(deltas: Sequence[Weights], trim_fraction: float = 0.2) -> Weights:
    """Per coordinate, drop the `trim_fraction` largest and smallest values and average the rest."""
    if not deltas:
        raise ValueError("no deltas to aggregate")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    cut = int(trim_fraction * len(deltas))
    merged = {}
    for name in deltas[0]:
        ordered = np.sort(_stack(deltas, name), axis=0)
        merged[name] = ordered[cut:len(deltas) - cut].mean(axis=0).astype(np.float32)
    return merged


def apply_delta(base: Weights, delta: Weights) -> Weights:
    """base + delta, tensor by tensor."""
    return {name: (base[name] + delta[name]).astype(base[name].dtype) for name in base}


def subtract(local: Weights, base: Weights) -> Weights:
    """local - base, tensor by tensor: a client's delta."""
    return {name: (local[name] - base[name]).astype(np.float32) for name in base}
