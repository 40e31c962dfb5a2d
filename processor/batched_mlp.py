"""Many clients' local SGD of an MLP task at once, in NumPy: the same steps as `rounds.local_update`
(plain SGD on the mean cross-entropy of each batch, each epoch in the order its seed draws), with
every client's weights stacked along a leading axis and each layer one batched matmul.

DP needs hundreds of clients per round; Keras trains them one after another at tens of ms each,
while here a round of 1,000 mnist clients of a few samples costs under a second. Only what such
rounds need: Dense chains with ReLU (`Task.hidden`), no EWC penalty, no private tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from processor.tasks import Task
from processor.training import TrainingSettings
from processor.weights import Weights


def _layers(task: Task) -> list[str]:
    """The Dense layers' names, input to output, as `processor.ewc.mlp` names them."""
    return [f"hidden_{i}" for i in range(len(task.hidden))] + ["output"]


def local_deltas(task: Task, base: Weights, shards: Sequence[tuple[np.ndarray, np.ndarray]],
                 training: TrainingSettings, seeds: Sequence[int]) -> Weights:
    """Each client's delta (trained minus `base`) after local SGD on its shard (x, y) from its seed,
    stacked: tensor name -> array of shape (clients, *shape).

    The first layer's kernel is never stacked: every SGD step adds x_b^T g to it, so client k's
    kernel stays the base's plus X_k^T A_k, X_k its rows and A_k one row of coefficients per row,
    and x_b of it is x_b W + (x_b X_k^T) A_k. That holds a client's first layer in its n_k x width
    coefficients instead of a 784 x width copy (400 MB for 1,000 mnist clients, a round's time).
    """
    if training.ewc_lambda != 0:
        raise ValueError("the batched clients train without EWC (ewc_lambda 0)")
    if any(len(y) == 0 for _, y in shards):
        raise ValueError("no local data to train on")
    clients, longest = len(shards), max(len(y) for _, y in shards)
    x = np.zeros((clients, longest, shards[0][0].shape[1]), np.float32)  # padded with zero rows
    y = np.zeros((clients, longest), np.int64)
    sizes = np.array([len(labels) for _, labels in shards])
    for k, (features, labels) in enumerate(shards):
        x[k, :len(labels)], y[k, :len(labels)] = features, labels
    gram = np.matmul(x, x.transpose(0, 2, 1))  # X_k X_k^T
    layers = _layers(task)
    first = base[f"{layers[0]}/kernel"]
    coefficients = np.zeros((clients, longest, first.shape[1]), np.float32)  # A_k
    kernels = [None] + [np.repeat(base[f"{name}/kernel"][None], clients, axis=0) for name in layers[1:]]
    biases = [np.repeat(base[f"{name}/bias"][None], clients, axis=0) for name in layers]
    orders = [np.random.default_rng(seed) for seed in seeds]
    rows = np.arange(clients)[:, None]
    rate = np.float32(training.learning_rate)
    real = np.arange(longest)[None, :] < sizes[:, None]
    for _ in range(training.epochs):
        # each client's rows in its epoch's order, then its padding rows (masked out of the loss); all
        # distinct, so that a batch's updates of A_k never land twice on one row
        order = np.tile(np.arange(longest), (clients, 1))
        for k, rng in enumerate(orders):
            order[k, :sizes[k]] = rng.permutation(sizes[k])
        for start in range(0, longest, training.batch_size):
            index = order[:, start:start + training.batch_size]
            batch_x, batch_y = x[rows, index], y[rows, index]
            mask = real[rows, index].astype(np.float32)
            counts = mask.sum(axis=1)
            activations = (np.matmul(batch_x, first) + np.matmul(gram[rows, index], coefficients)
                           + biases[0][:, None, :])
            inputs = [batch_x]
            for i in range(1, len(layers)):
                activations = np.maximum(activations, 0)
                inputs.append(activations)
                activations = np.matmul(activations, kernels[i]) + biases[i][:, None, :]
            # d(mean cross-entropy)/d(logits): softmax minus one-hot, over each client's own batch size
            logits = activations - activations.max(axis=2, keepdims=True)
            gradient = np.exp(logits)
            gradient /= gradient.sum(axis=2, keepdims=True)
            gradient[rows, np.arange(batch_y.shape[1])[None, :], batch_y] -= 1
            gradient *= (mask / np.maximum(counts, 1)[:, None])[:, :, None]
            for i in reversed(range(1, len(layers))):
                below = inputs[i]
                kernel_gradient = np.matmul(below.transpose(0, 2, 1), gradient)
                biases[i] -= rate * gradient.sum(axis=1)
                gradient = np.matmul(gradient, kernels[i].transpose(0, 2, 1)) * (below > 0)
                kernels[i] -= rate * kernel_gradient
            coefficients[rows, index] -= rate * gradient  # the first kernel's step, x_b^T g, as A_k's rows
            biases[0] -= rate * gradient.sum(axis=1)
    deltas: Weights = {f"{layers[0]}/kernel": np.matmul(x.transpose(0, 2, 1), coefficients)}
    for i, name in enumerate(layers):
        if i:
            deltas[f"{name}/kernel"] = kernels[i] - base[f"{name}/kernel"][None]
        deltas[f"{name}/bias"] = biases[i] - base[f"{name}/bias"][None]
    return {name: deltas[name] for name in task.spec}
