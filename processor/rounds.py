"""The steps of a round, shared by the apps, the simulation and the benchmarks.

The organization: `initial_model`, `make_base` (weights + Fisher), `aggregate`.
A client: `local_update` (train from the base with the plan's penalty, return the delta; for
FedCurv also the base's Fisher on its data, which the organization sums: `penalty.round_curvature`).

Weights here are the task's global tensors (`Task.spec`). A device's private tensors (its users'
state, `Task.private_spec`) go into its training and come back beside the delta, never in it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from processor import aggregate as agg
from processor import penalty
from processor.ewc import fisher_diagonal, get_weights, model_inputs, set_weights
from processor.penalty import Curvature
from processor.tasks import Task
from processor.training import TrainingSettings
from processor.weights import Weights

# Called after every batch with {"epoch": epochs done, "epochs", "batch": batches done in the
# current epoch, "batches": per epoch}, and at the end of each epoch with its metrics (loss, ...)
# and batch 0: the share done is always (epoch * batches + batch) / (epochs * batches).
ProgressFn = Callable[[dict], None]


@dataclass
class Base:
    """A round's base model: the weights every client starts from and the Fisher that anchors EWC."""
    weights: Weights
    fisher: Weights


@dataclass
class LocalResult:
    delta: Weights  # of the global tensors
    private: Weights  # the device's private tensors after training: it keeps them for the next round
    num_samples: int
    metrics_before: dict[str, float]  # base model on the client's own data
    metrics_after: dict[str, float]  # locally trained model on the client's own data
    fisher: Weights | None = None  # with the fedcurv regularizer: the base's Fisher on the client's data, mean 1


def initial_model(task: Task, seed: int = 0, pretrain_epochs: int = 0,
                  training: TrainingSettings = TrainingSettings()) -> Weights:
    """Random weights from `seed`, optionally pretrained on the organization's validation data
    for `pretrain_epochs` (with the batch size and learning rate of `training`, and no EWC)."""
    weights = shared(task, get_weights(task.build_model(seed)))
    if pretrain_epochs > 0:
        data = task.data()
        zeros = {n: np.zeros_like(w) for n, w in weights.items()}
        pretraining = replace(training, epochs=pretrain_epochs, ewc_lambda=0.0)
        # the organization's users are not the devices': their private state is not kept
        weights = shared(task, train(task, weights, zeros, data.x_val, data.y_val, pretraining, seed=seed))
    return weights


def shared(task: Task, tensors: Weights) -> Weights:
    """The global tensors of `tensors`."""
    return {n: tensors[n] for n in task.spec}


def private_part(task: Task, tensors: Weights) -> Weights:
    """The private tensors of `tensors`."""
    return {n: tensors[n] for n in task.private_spec}


def make_base(task: Task, weights: Weights) -> Base:
    """The base model of a round: `weights` with their Fisher on the organization's validation data
    (its users unknown to the model: no private state)."""
    data = task.data()
    return Base(weights, fisher_of(task, weights, data.x_val, data.y_val))


def fisher_of(task: Task, weights: Weights, x: np.ndarray, y: np.ndarray, private: Weights | None = None) -> Weights:
    """The Fisher of the global `weights` (with a device's `private` tensors, zero when None) on (x, y)."""
    with task.lock:
        model = task.model()
        set_weights(model, {**weights, **(task.initial_private() if private is None else private)})
        return fisher_diagonal(model, x, y, numeric=task.numeric_label)


def train(task: Task, weights: Weights, fisher: Weights, x: np.ndarray, y: np.ndarray, training: TrainingSettings,
          seed: int, progress: ProgressFn | None = None, private: Weights | None = None,
          others: Curvature | None = None) -> Weights:
    """SGD from `weights` and the device's `private` tensors (zero when None) on (x, y), with the
    plan's penalty (`penalty.quadratic`: `fisher` is the base's on the organization's data, `others`
    the other clients' FedCurv statistics of the last round); the trained tensors, global and private.

    Every epoch visits the samples in a new order drawn from `seed` alone.
    """
    if len(y) == 0:
        raise ValueError("no local data to train on")
    orders = np.random.default_rng(seed)
    with task.lock:
        model = task.model()
        set_weights(model, {**weights, **(task.initial_private() if private is None else private)})
        model.set_anchor(*penalty.quadratic(training.regularizer, weights, fisher, others), training.ewc_lambda)
        model.optimizer.learning_rate = training.learning_rate
        batches_per_epoch = -(-len(y) // training.batch_size)
        for epoch in range(training.epochs):
            order = orders.permutation(len(y))
            # Batches of arrays shuffled here: given the arrays, Keras builds and traces a shuffling
            # tf.data pipeline on every fit, which cost three times the epoch itself (mnist client).
            batches = tf.data.Dataset.from_tensor_slices((model_inputs(x[order]), y[order])).batch(training.batch_size)
            callbacks = [BatchProgress(progress, epoch, training.epochs, batches_per_epoch)] if progress else []
            logs = model.fit(batches, epochs=1, shuffle=False, verbose=0, callbacks=callbacks).history
            if progress:
                progress({"epoch": epoch + 1, "epochs": training.epochs, "batch": 0, "batches": batches_per_epoch,
                          **{name: float(values[-1]) for name, values in logs.items()}})
        return get_weights(model)


class BatchProgress(keras.callbacks.Callback):
    """Hands `progress` the batches done so far in epoch `epoch` (counted from 0) of `epochs`."""

    # It reads only the batch's index: Keras may call it from a worker thread without waiting for
    # the batch's metrics, which a per-batch hook would otherwise cost (about 1 ms a batch).
    async_safe = True

    def __init__(self, progress: ProgressFn, epoch: int, epochs: int, batches: int) -> None:
        super().__init__()
        self.report = progress
        self.counts = {"epoch": epoch, "epochs": epochs, "batches": batches}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.report({**self.counts, "batch": batch + 1})


def local_update(task: Task, base_weights: Weights, fisher: Weights, x: np.ndarray, y: np.ndarray,
                 training: TrainingSettings, seed: int, progress: ProgressFn | None = None,
                 private: Weights | None = None, others: Curvature | None = None) -> LocalResult:
    """A client's round: train from the base and its `private` tensors (zero when None) on local
    data with the plan's penalty (as `train`); the delta of the global tensors, and the private
    ones trained. With FedCurv, also the base's Fisher on its data (sent with the delta)."""
    own = fisher_of(task, base_weights, x, y, private) if training.regularizer == "fedcurv" else None
    local = train(task, base_weights, fisher, x, y, training, seed, progress, private, others)
    trained_global, trained_private = shared(task, local), private_part(task, local)
    return LocalResult(delta=agg.subtract(trained_global, base_weights), private=trained_private,
                       num_samples=int(len(y)), metrics_before=task.evaluate(base_weights, x, y, private),
                       metrics_after=task.evaluate(trained_global, x, y, trained_private),
                       fisher=None if own is None else penalty.scale_free(own))


def aggregate(base_weights: Weights, deltas: Iterable[tuple[Weights, int]], method: str = "fedavg",
              clip_norm: float | None = None, trim_fraction: float = 0.2, server_rate: float = 1.0) -> Weights:
    """The next base model: base + `server_rate` x the merged deltas.

    fedavg streams (one delta in memory at a time); median and trimmed_mean hold them all.
    With `clip_norm`, every delta is first scaled down to at most that L2 norm. A server rate above
    1 (a server learning rate, FedOpt's) lengthens the step: DP rounds clip every delta short.
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
    if server_rate != 1.0:
        merged = {name: np.float32(server_rate) * t for name, t in merged.items()}
    return agg.apply_delta(base_weights, merged)
