"""A delta as a secure round carries it, and the round's sum turned back into a mean delta.

A client clips each coordinate of its (L2-clipped, possibly noised) delta to the round's bound,
quantizes it into Z_{2^32} and adds its pairwise masks (processor.secagg); the organization adds
the masked deltas, removes the masks of the clients that dropped out, and divides by the number
of clients. The tensors travel flattened in the task's order (`names`).
"""
from __future__ import annotations

import numpy as np

from processor import secagg
from processor.weights import Weights

NOISE_ALLOWANCE = 6.0  # noise standard deviations a coordinate may add to the clip norm before it is clipped


def quantization_bound(clip_norm: float, noise_std: float) -> float:
    """The largest |coordinate| a secure round carries: no coordinate of an L2-clipped delta
    exceeds its clip norm, and Gaussian noise adds more than NOISE_ALLOWANCE of its standard
    deviations to one of a million coordinates with probability 2e-3 (clipped then: post-processing)."""
    if not clip_norm > 0:
        raise ValueError("secure aggregation needs a clip norm: it bounds what each client's values can be")
    return clip_norm + NOISE_ALLOWANCE * noise_std


def flatten(tensors: Weights, names: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(tensors[n]) for n in names]) if names else np.zeros(0)


def unflatten(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> Weights:
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def masked_delta(delta: Weights, quantizer: secagg.Quantizer, me: str, mask_secret: bytes,
                 peers: dict[str, bytes], context: bytes, rng: np.random.Generator) -> Weights:
    """`delta` quantized (stochastic rounding by `rng`) and masked against `peers` (address ->
    public mask key, every client on the mask roster but this one)."""
    shapes = {n: np.shape(t) for n, t in delta.items()}
    values = np.clip(flatten(delta, list(shapes)), -quantizer.bound, quantizer.bound)
    masked = secagg.mask(quantizer.quantize(values, rng), me, mask_secret, peers, context)
    return unflatten(masked, shapes)


def unmasked_mean(masked: list[Weights], quantizer: secagg.Quantizer, survivors: dict[str, bytes],
                  dropped_secrets: dict[str, bytes], context: bytes) -> Weights:
    """The mean of the survivors' deltas from their `masked` ones (in the order of `survivors`):
    added in the field, the masks they agreed with the dropped clients removed with those
    clients' recovered secrets, dequantized and divided by their number."""
    if not masked:
        raise ValueError("no masked deltas to add")
    shapes = {n: np.shape(t) for n, t in masked[0].items()}
    names = list(shapes)
    total = secagg.add(flatten(m, names).astype(np.uint32, copy=False) for m in masked)
    plain = secagg.unmask_sum(total, survivors, dropped_secrets, context)
    mean = quantizer.dequantize_sum(plain, len(masked)) / len(masked)
    return {n: t.astype(np.float32) for n, t in unflatten(mean, shapes).items()}
