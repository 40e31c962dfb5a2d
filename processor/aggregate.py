"""Aggregation of client deltas: small pure NumPy functions, apart from any orchestration.

FedAvg is streaming (a running weighted sum, one delta in memory at a time); median and trimmed
mean need every delta at once by nature.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy.linalg.blas import saxpy

from processor.weights import Weights

AGGREGATIONS = ("fedavg", "median", "trimmed_mean")  # what a round's plan may name


def l2_norm(tensors: Weights) -> float:
    """The L2 norm of all tensors taken as one flat vector."""
    # a BLAS dot per tensor: one pass and no temporary, unlike summing squares
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an infinite norm, rejected upstream
        return float(np.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in tensors.values())))


def cosine(a: Weights, b: Weights) -> float:
    """The cosine of the angle between `a` and `b` taken as flat vectors (0 when either is zero)."""
    dot = sum(float(np.dot(a[name].ravel().astype(np.float64), b[name].ravel().astype(np.float64))) for name in a)
    norms = l2_norm(a) * l2_norm(b)
    return dot / norms if norms > 0 else 0.0


def clip_factor(norm: float, max_norm: float | None) -> float:
    """What a delta of L2 norm `norm` is scaled by to clip it to `max_norm` (None: no clipping)."""
    return 1.0 if max_norm is None or norm <= max_norm or norm == 0.0 else max_norm / norm


def clip_by_norm(delta: Weights, max_norm: float) -> Weights:
    """`delta` scaled down to L2 norm `max_norm` when it is longer; unchanged otherwise."""
    scale = clip_factor(l2_norm(delta), max_norm)
    if scale == 1.0:
        return delta
    return {name: (t * scale).astype(t.dtype) for name, t in delta.items()}


def weighted_mean(deltas: Iterable[tuple[Weights, int]]) -> Weights:
    """FedAvg: the mean of the deltas weighted by their sample counts, in one streaming pass.

    One delta in memory at a time; the running sum is float32 and updated in place with BLAS
    saxpy (sum += n * delta in one fused pass, where NumPy needs a multiply and an add over a
    temporary: 3x the memory traffic). The rounding error of a float32 sum of 1000 deltas (~1e-6
    relative) is far below the noise of SGD; Flower's FedAvg also sums in float32.
    """
    total: Weights | None = None
    samples = 0
    for delta, num_samples in deltas:
        if num_samples <= 0:
            raise ValueError(f"a delta must come with a positive sample count, got {num_samples}")
        if total is None:
            total = {name: np.zeros(t.shape, np.float32) for name, t in delta.items()}
        for name, t in delta.items():
            # reshape(-1) of a contiguous array is a view: saxpy writes straight into the sum
            saxpy(np.ascontiguousarray(t, np.float32).reshape(-1), total[name].reshape(-1), a=float(num_samples))
        samples += num_samples
    if total is None:
        raise ValueError("no deltas to aggregate")
    for t in total.values():
        np.divide(t, np.float32(samples), out=t)
    return total


def unit_weights(deltas: Iterable[tuple[Weights, int]]) -> Iterator[tuple[Weights, int]]:
    """The deltas each with weight 1, whatever their sample counts: `weighted_mean` of them is their
    plain mean. DP rounds merge so: one client's influence on the sum is bounded by the clip norm
    only when no client's weight exceeds 1 (a sample count would multiply it)."""
    return ((delta, 1) for delta, _ in deltas)


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
