"""A delta as a secure round carries it, and the round's sum turned back into a mean delta.

A client clips each coordinate of its (L2-clipped, possibly noised) delta to the round's bound,
quantizes it into Z_{2^32} and adds its pairwise masks (processor.secagg); the organization adds
the masked deltas, removes the masks of the clients that dropped out, and divides by the number
of clients. The tensors travel flattened (processor.weights.flatten), in the first update's order.
"""
from __future__ import annotations

import numpy as np

from processor import secagg
from processor.privacy import PrivacyPlan, client_noise_std
from processor.weights import Weights, flatten, unflatten

NOISE_ALLOWANCE = 6.0  # noise standard deviations a coordinate may add to the clip norm before it is clipped


def quantization_bound(plan: PrivacyPlan) -> float:
    """The largest |coordinate| a secure round of `plan` carries: no coordinate of an L2-clipped
    delta exceeds its clip norm (which a secure plan has), and Gaussian noise adds more than
    NOISE_ALLOWANCE of its standard deviations to one of a million coordinates with probability
    2e-3 (clipped then: post-processing)."""
    return plan.clip_norm + NOISE_ALLOWANCE * client_noise_std(plan)


def masked_delta(delta: Weights, quantizer: secagg.Quantizer, me: str, mask_secret: bytes,
                 peers: dict[str, bytes], context: bytes, rng: np.random.Generator) -> Weights:
    """`delta` quantized (stochastic rounding by `rng`) and masked against `peers` (address ->
    public mask key, every client on the mask roster but this one)."""
    values = np.clip(flatten(delta), -quantizer.bound, quantizer.bound)
    return unflatten(secagg.mask(quantizer.quantize(values, rng), me, mask_secret, peers, context), delta)


def unmasked_mean(masked: list[Weights], quantizer: secagg.Quantizer, survivors: dict[str, bytes],
                  dropped_secrets: dict[str, bytes], context: bytes) -> Weights:
    """The mean of the survivors' deltas from their `masked` ones (in the order of `survivors`):
    added in the field, the masks they agreed with the dropped clients removed with those
    clients' recovered secrets, dequantized and divided by their number."""
    if not masked:
        raise ValueError("no masked deltas to add")
    total = secagg.add(flatten({n: m[n] for n in masked[0]}).astype(np.uint32, copy=False) for m in masked)
    plain = secagg.unmask_sum(total, survivors, dropped_secrets, context)
    mean = quantizer.dequantize_sum(plain, len(masked)) / len(masked)
    return {n: t.astype(np.float32) for n, t in unflatten(mean, masked[0]).items()}
