"""What local training's quadratic penalty lambda/2 * sum_i F_i (w_i - a_i)^2 is anchored at (a) and
weighs each coordinate by (F), for each regularizer a round's plan may name. Pure NumPy.

- ewc: a = the base model, F = its diagonal Fisher on the organization's validation data
  (Kirkpatrick et al. 2017).
- fedprox: a = the base model, F = 1 everywhere: mu/2 ||w - w_base||^2 (Li et al. 2020).
- fedcurv: each client k sends the diagonal Fisher F_k of the base on its own data with its
  delta; the organization sums F_k and u_k = F_k * w_k (w_k its trained weights, as merged) over
  the round's merged updates and publishes both sums with the next base. Client k's penalty
  sum_{j != k} F_j (w - w_j)^2 is, up to a constant, one quadratic with F = sum_{j != k} F_j and
  a = (sum_{j != k} u_j) / F (Shoham et al. 2019); it takes its own part out of the sums. Each
  F_k is scaled to mean 1 first, so no client outweighs another by the magnitude it claims.

F is divided by its mean over all coordinates (`scale_free`), so lambda means the same for each
regularizer and task: the pull on an average coordinate, FedProx's mu.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from processor.weights import Weights

log = logging.getLogger("processor.penalty")

REGULARIZERS = ("ewc", "fedprox", "fedcurv")  # processor.training lists them again, without numpy


@dataclass(frozen=True)
class Curvature:
    """FedCurv's statistics: a client's (or the sum over a round's clients') Fisher F and F * w."""
    fisher: Weights
    pull: Weights  # F * w: the Fisher times the trained weights


@dataclass(frozen=True)
class SentStatistics:
    """What a client sent to round `round_id`: enough to compute its part of the round's statistics."""
    round_id: int
    base: Weights  # the round's base weights
    delta: Weights  # its delta, as it sent it
    fisher: Weights  # the base's Fisher on its data, as it sent it


@dataclass(frozen=True)
class RoundCurvature:
    """The statistics a base model carries: the sum over round `round_id`'s merged updates, and the
    factor by which each of their clients' deltas entered it (1, or less where the merge clipped it)."""
    total: Curvature
    round_id: int
    scales: dict[str, float]  # client (as the organization names it, lowercase) -> factor


def contribution(sent: SentStatistics, scale: float = 1.0) -> Curvature:
    """What one client adds to its round's statistics: its Fisher scaled to mean 1 (every client
    weighs the same, whatever magnitude it claims), and that Fisher times the weights it trained,
    as they were merged: the base plus `scale` times its delta."""
    fisher = scale_free(sent.fisher)
    factor = np.float32(scale)
    return Curvature(fisher, {n: (f * (sent.base[n] + factor * sent.delta[n])).astype(np.float32)
                              for n, f in fisher.items()})


def round_curvature(round_id: int, merged: Iterable[tuple[str, SentStatistics, float]]) -> RoundCurvature | None:
    """The statistics of round `round_id` from its merged updates, (client, what it sent, its
    factor) each; None when none was merged."""
    merged = list(merged)
    if not merged:
        return None
    return RoundCurvature(summed(contribution(sent, scale) for _, sent, scale in merged), round_id,
                          {client.lower(): scale for client, _, scale in merged})


def summed(curvatures: Iterable[Curvature]) -> Curvature:
    """The organization's sum of its clients' statistics (in float64, returned as float32)."""
    fisher: dict[str, np.ndarray] = {}
    pull: dict[str, np.ndarray] = {}
    for c in curvatures:
        for name in c.fisher:
            fisher[name] = fisher.get(name, 0.0) + c.fisher[name].astype(np.float64)
            pull[name] = pull.get(name, 0.0) + c.pull[name].astype(np.float64)
    if not fisher:
        raise ValueError("no curvature statistics to sum")
    return Curvature({n: f.astype(np.float32) for n, f in fisher.items()},
                     {n: p.astype(np.float32) for n, p in pull.items()})


def others_for(published: RoundCurvature | None, client: str, sent: SentStatistics | None) -> Curvature | None:
    """What pulls `client`'s training: the published statistics less its own part, when they hold
    one. A client that no longer holds what it sent (it restarted) is pulled by the whole sum."""
    if published is None:
        return None
    scale = published.scales.get(client.lower())
    if scale is None:
        return published.total
    if sent is None or sent.round_id != published.round_id:
        log.warning("%s cannot take its own part out of round %d's FedCurv statistics: it no longer holds what "
                    "it sent", client, published.round_id)
        return published.total
    return without(published.total, contribution(sent, scale))


def without(total: Curvature, own: Curvature) -> Curvature:
    """The others' statistics: `total` less a client's `own` (its penalty pulls towards the others
    only). Rounding can leave a Fisher a little below zero: it is cut at zero."""
    fisher = {n: np.maximum(f - own.fisher[n], 0.0) for n, f in total.fisher.items()}
    return Curvature(fisher, {n: np.where(fisher[n] > 0, p - own.pull[n], 0.0).astype(np.float32)
                              for n, p in total.pull.items()})


def scale_free(fisher: Weights) -> Weights:
    """`fisher` divided by its mean over every coordinate (all zero stays all zero)."""
    total = sum(float(np.sum(f, dtype=np.float64)) for f in fisher.values())
    count = sum(f.size for f in fisher.values())
    scale = count / total if total > 0 else 0.0
    return {n: (f * scale).astype(np.float32) for n, f in fisher.items()}


def quadratic(regularizer: str, base: Weights, fisher: Weights,
              others: Curvature | None = None) -> tuple[Weights, Weights]:
    """(anchor, importance) of the penalty of `regularizer` for a client starting from `base`:
    `fisher` is the base's Fisher on the organization's data (ewc), `others` the other clients'
    statistics of the last round (fedcurv; None before any: no pull, as FedAvg)."""
    if regularizer == "ewc":
        return base, scale_free(fisher)
    if regularizer == "fedprox":
        return base, {n: np.ones_like(w, np.float32) for n, w in base.items()}
    if regularizer == "fedcurv":
        if others is None:
            return base, {n: np.zeros_like(w, np.float32) for n, w in base.items()}
        # where no client's Fisher holds a coordinate, nothing pulls it: any anchor will do
        anchor = {n: np.where(f > 0, others.pull[n] / np.where(f > 0, f, 1.0), base[n]).astype(np.float32)
                  for n, f in others.fisher.items()}
        return anchor, scale_free(others.fisher)
    raise ValueError(f"unknown regularizer {regularizer!r}; choose one of {', '.join(REGULARIZERS)}")
