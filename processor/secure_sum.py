"""A delta as a secure round carries it, and the round's sums turned back into a mean delta.

A client clips each coordinate of its (L2-clipped, possibly noised) delta to the round's bound,
quantizes it into Z_{2^32} and adds its pairwise masks with the other members of its group and its
self mask (processor.secagg); the organization adds each group's masked deltas, removes the self
masks and the masks of the clients that dropped out, and divides by the group's number; the
groups' means are merged by their coordinate median. The tensors travel flattened
(processor.weights.flatten), in the first update's order.
"""
from __future__ import annotations

import math

import numpy as np

from processor import secagg
from processor.codec import SAMPLES_TENSOR
from processor.aggregate import clip_by_norm, coordinate_median, cosine, l2_norm, weighted_mean
from processor.privacy import NOISE_NORM_MARGIN, PrivacyPlan, client_noise_std
from processor.weights import Weights, flatten, unflatten

NOISE_ALLOWANCE = 6.0  # noise standard deviations a coordinate may add to the clip norm before it is clipped


def quantization_bound(plan: PrivacyPlan) -> float:
    """The largest |coordinate| a secure round of `plan` carries: no coordinate of an L2-clipped
    delta exceeds its clip norm (which a secure plan has), and Gaussian noise adds more than
    NOISE_ALLOWANCE of its standard deviations to one of a million coordinates with probability
    2e-3 (clipped then: post-processing)."""
    return plan.clip_norm + NOISE_ALLOWANCE * client_noise_std(plan)


def masked_delta(delta: Weights, quantizer: secagg.Quantizer, me: str, mask_secret: bytes, seed: bytes,
                 peers: dict[str, bytes], context: bytes, rng: np.random.Generator, num_samples: int) -> Weights:
    """`delta` quantized (stochastic rounding by `rng`) and `num_samples` beside it, masked:
    pairwise against `peers` (address -> public mask key, every other client of its group) and by
    its own self mask of `seed`. The sample count travels as codec.SAMPLES_TENSOR."""
    values = np.clip(flatten(delta), -quantizer.bound, quantizer.bound)
    plain = np.append(quantizer.quantize(values, rng), np.uint32(num_samples))
    masked = secagg.mask(plain, me, mask_secret, peers, context, seed)
    return {**unflatten(masked[:-1], delta), SAMPLES_TENSOR: masked[-1:]}


def group_mean(masked: list[Weights], quantizer: secagg.Quantizer, survivors: dict[str, bytes], context: bytes,
               seeds: dict[str, bytes], dropped_secrets: dict[str, bytes],
               dropped_pair_keys: dict[str, dict[str, bytes]]) -> tuple[Weights, int]:
    """The mean of one group's survivors' deltas from their `masked` ones, and their total sample
    count: added in the field, the self masks and the masks agreed with the dropped clients removed
    (processor.secagg.unmask_sum), dequantized and divided by their number.

    ValueError when the unmasked sum holds a value no `len(masked)` quantized vectors can add up to
    (above len(masked) x levels): a member added values outside the quantization range, or revealed
    a wrong key or seed. Such a sum says nothing of the honest members' deltas."""
    if not masked:
        raise ValueError("no masked deltas to add")
    names = [n for n in masked[0] if n != SAMPLES_TENSOR]

    def vector(m: Weights) -> np.ndarray:  # in the order the client masked it: the delta, then its count
        return np.append(flatten({n: m[n] for n in names}).astype(np.uint32, copy=False), m[SAMPLES_TENSOR])

    total = secagg.add(vector(m) for m in masked)
    plain = secagg.unmask_sum(total, survivors, context, seeds, dropped_secrets, dropped_pair_keys)
    values, samples = plain[:-1], int(plain[-1])
    largest = int(values.max(initial=0))
    if largest > len(masked) * quantizer.levels:
        raise ValueError(f"its unmasked sum holds {largest}, above the {len(masked) * quantizer.levels} that "
                         f"{len(masked)} quantized vectors can reach: a member added values outside the "
                         "quantization range, or revealed a wrong key or seed")
    mean = quantizer.dequantize_sum(values, len(masked)) / len(masked)
    return {n: t.astype(np.float32) for n, t in unflatten(mean, {n: masked[0][n] for n in names}).items()}, samples


def group_mean_bound(plan: PrivacyPlan, dimension: int, members: int, roster: int) -> float:
    """The largest L2 norm the mean of `members` honest deltas of `plan` plausibly has, in a round
    whose mask roster holds `roster` clients: each is clipped to C, so their mean is too, plus the
    mean of their noises (std s / sqrt(members) per coordinate, bounded as privacy.max_update_norm
    bounds one client's) and one quantization step a coordinate. A group mean beyond it holds a
    member that did not clip."""
    quantizer_step = secagg.Quantizer(bound=quantization_bound(plan), max_clients=max(roster, 1)).step
    noise = client_noise_std(plan) / math.sqrt(members) * (math.sqrt(dimension) + NOISE_NORM_MARGIN)
    return plan.clip_norm + noise + quantizer_step * math.sqrt(dimension)


def merge_groups(means: list[tuple[Weights, int]]) -> tuple[Weights, dict[int, str]]:
    """The round's delta from its groups' means (each with its number of members), and the groups
    left out of it (by index in `means`) with why.

    With at least three groups, a group whose mean points away from the consensus (cosine at or
    below 0 with the coordinate median of all the means) is left out; the others' means are
    clipped to the median of their L2 norms and merged by their coordinate median (by their mean
    when two are left), so that one group's mean (one hostile member's choice) is no longer than
    an honest group's and moves no coordinate beyond the others'. With fewer groups, their mean
    weighted by members, which no rule can make robust."""
    if not means:
        raise ValueError("no group means to merge")
    if len(means) < 3:
        return (means[0][0] if len(means) == 1 else weighted_mean(means)), {}
    consensus = coordinate_median([mean for mean, _ in means])
    refused = {}
    for index, (mean, _) in enumerate(means):
        agreement = cosine(mean, consensus)
        if not agreement > 0:
            refused[index] = (f"its mean points away from the other groups' (cosine {agreement:.3f} with their "
                              "coordinate median)")
    if len(means) - len(refused) < 2:  # no consensus to point away from
        refused = {}
    kept = [mean for index, (mean, _) in enumerate(means) if index not in refused]
    median_norm = float(np.median([l2_norm(mean) for mean in kept]))
    kept = [clip_by_norm(mean, median_norm) for mean in kept]
    if len(kept) >= 3:
        return coordinate_median(kept), refused
    return weighted_mean((mean, 1) for mean in kept), refused
