"""What local training's quadratic penalty lambda/2 * sum_i F_i (w_i - a_i)^2 is anchored at (a) and
weighs each coordinate by (F), for each regularizer a round's plan may name. Pure NumPy.

- ewc: a = the base model, F = its diagonal Fisher on the organization's validation data
  (Kirkpatrick et al. 2017).
- fedprox: a = the base model, F = 1 everywhere: mu/2 ||w - w_base||^2 (Li et al. 2020).
- fedcurv: each client k sends the diagonal Fisher F_k of the base on its own data and
  u_k = F_k * w_k of its trained weights w_k; the organization sums both over the round. Client k's
  penalty sum_{j != k} F_j (w - w_j)^2 is, up to a constant, one quadratic with
  F = sum_{j != k} F_j and a = (sum_{j != k} u_j) / F (Shoham et al. 2019).

F is divided by its mean over all coordinates (`scale_free`), so lambda means the same for each
regularizer and task: the pull on an average coordinate, FedProx's mu.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from processor.weights import Weights

REGULARIZERS = ("ewc", "fedprox", "fedcurv")  # processor.training lists them again, without numpy


@dataclass(frozen=True)
class Curvature:
    """FedCurv's statistics: a client's (or the sum over a round's clients') Fisher F and F * w."""
    fisher: Weights
    pull: Weights  # F * w: the Fisher times the trained weights


def curvature(fisher: Weights, trained: Weights) -> Curvature:
    """A client's FedCurv statistics: the Fisher of the base on its data and the weights it trained."""
    return Curvature(fisher, {n: (f * trained[n]).astype(np.float32) for n, f in fisher.items()})


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
