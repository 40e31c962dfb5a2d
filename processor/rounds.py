"""The steps of a round, shared by the apps, the simulation and the benchmarks.

The organization: `initial_model`, `make_base` (weights + Fisher), `aggregate`.
A client: `local_update` (train from the base with EWC, return the delta).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import tensorflow as tf

from processor import aggregate as agg
from processor.ewc import fisher_diagonal, get_weights, set_weights
from processor.tasks import Task
from processor.training import TrainingSettings
from processor.weights import Weights

ProgressFn = Callable[[int, int, dict], None]  # (epoch done, epochs, logs)


@dataclass
class Base:
    """A round's base model: the weights every client starts from and the Fisher that anchors EWC."""
    weights: Weights
    fisher: Weights


@dataclass
class LocalResult:
    delta: Weights
    num_samples: int
    metrics_before: dict[str, float]  # base model on the client's own data
    metrics_after: dict[str, float]  # locally trained model on the client's own data


def initial_model(task: Task, seed: int = 0, pretrain_epochs: int = 0,
                  training: TrainingSettings = TrainingSettings()) -> Weights:
    """Random weights from `seed`, optionally pretrained on the organization's validation data
    for `pretrain_epochs` (with the batch size and learning rate of `training`, and no EWC)."""
    weights = get_weights(task.build_model(seed))
    if pretrain_epochs > 0:
        data = task.data()
        zeros = {n: np.zeros_like(w) for n, w in weights.items()}
        pretraining = replace(training, epochs=pretrain_epochs, ewc_lambda=0.0)
        weights = train(task, weights, zeros, data.x_val, data.y_val, pretraining, seed=seed)
    return weights


def make_base(task: Task, weights: Weights) -> Base:
    """The base model of a round: `weights` with their Fisher on the organization's validation data."""
    data = task.data()
    with task.lock:
        model = task.model()
        set_weights(model, weights)
        return Base(weights, fisher_diagonal(model, data.x_val, data.y_val))


def train(task: Task, weights: Weights, fisher: Weights, x: np.ndarray, y: np.ndarray, training: TrainingSettings,
          seed: int, progress: ProgressFn | None = None) -> Weights:
    """SGD from `weights` on (x, y) with the EWC penalty anchored at `weights`; the trained weights.

    Every epoch visits the samples in a new order drawn from `seed` alone.
    """
    if len(y) == 0:
        raise ValueError("no local data to train on")
    orders = np.random.default_rng(seed)
    with task.lock:
        model = task.model()
        set_weights(model, weights)
        model.set_anchor(weights, fisher, training.ewc_lambda)
        model.optimizer.learning_rate = training.learning_rate
        for epoch in range(training.epochs):
            order = orders.permutation(len(y))
            # Batches of arrays shuffled here: given the arrays, Keras builds and traces a shuffling
            # tf.data pipeline on every fit, which cost three times the epoch itself (mnist client).
            batches = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(training.batch_size)
            logs = model.fit(batches, epochs=1, shuffle=False, verbose=0).history
            if progress:
                progress(epoch + 1, training.epochs, {name: float(values[-1]) for name, values in logs.items()})
        return get_weights(model)


def local_update(task: Task, base_weights: Weights, fisher: Weights, x: np.ndarray, y: np.ndarray,
                 training: TrainingSettings, seed: int, progress: ProgressFn | None = None) -> LocalResult:
    """A client's round: train from the base on local data with EWC and return the delta."""
    local = train(task, base_weights, fisher, x, y, training, seed, progress)
    return LocalResult(delta=agg.subtract(local, base_weights), num_samples=int(len(y)),
                       metrics_before=task.evaluate(base_weights, x, y), metrics_after=task.evaluate(local, x, y))


def aggregate(base_weights: Weights, deltas: Iterable[tuple[Weights, int]], method: str = "fedavg",
              clip_norm: float | None = None, trim_fraction: float = 0.2) -> Weights:
    """The next base model: base + the merged deltas.

    fedavg streams (one delta in memory at a time); median and trimmed_mean hold them all.
    With `clip_norm`, every delta is first scaled down to at most that L2 norm.
    """
    if method not in agg.AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(agg.AGGREGATIONS)}")
    if clip_norm is not None:
        deltas = ((agg.clip_by_norm(delta, clip_norm), n) for delta, n in deltas)
    if method == "fedavg":
        merged = agg.weighted_mean(deltas)
    else:
        collected = [delta for delta, _ in deltas]
        merged = agg.coordinate_median(collected) if method == "median" else \
            agg.trimmed_mean(collected, trim_fraction)
    return agg.apply_delta(base_weights, merged)
