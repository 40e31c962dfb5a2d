"""Keras models with Elastic Weight Consolidation, the diagonal Fisher, and weight dictionaries.

EWC (Kirkpatrick et al. 2017) adds lambda/2 * sum_i F_i (w_i - w*_i)^2 to the local loss, where
w* is the base model and F its diagonal Fisher information (minimised with a stable implicit
step). Anchor, Fisher and lambda live in non-trainable variables: a new round assigns them, and
the compiled train step is reused. The penalty holds the global tensors only: a device's private
tensors (its users' state, `processor.weights.is_private`) are its own to move.
"""
from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from processor.weights import Weights, is_private


class EWCModel(keras.Model):
    """A Keras model whose train step adds the EWC penalty; lambda = 0 is plain training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ewc_lambda = keras.Variable(0.0, trainable=False, name="ewc_lambda")
        self.anchor = [keras.Variable(np.zeros(v.shape, np.float32), trainable=False, name=f"anchor_{i}")
                       for i, v in enumerate(self.global_variables)]
        self.fisher = [keras.Variable(np.zeros(v.shape, np.float32), trainable=False, name=f"fisher_{i}")
                       for i, v in enumerate(self.global_variables)]

    @property
    def global_variables(self) -> list:
        """The trainable variables every device shares (all but the private ones), in model order."""
        return [v for v in self.trainable_variables if not is_private(v.path)]

    def set_anchor(self, anchor: Weights, fisher: Weights, ewc_lambda: float) -> None:
        """Anchor the penalty at `anchor` with importance `fisher` (global tensors); no retrace follows."""
        for variable, anchor_var, fisher_var in zip(self.global_variables, self.anchor, self.fisher):
            anchor_var.assign(anchor[variable.path])
            fisher_var.assign(fisher[variable.path])
        self.ewc_lambda.assign(float(ewc_lambda))

    def ewc_penalty(self):
        return tf.add_n([tf.reduce_sum(f * tf.square(w - a))
                         for w, a, f in zip(self.global_variables, self.anchor, self.fisher)])

    def train_step(self, data):
        """One SGD step on the data loss, then the EWC penalty's step taken implicitly.

        The explicit gradient step on lambda/2 * F (w - w*)^2 diverges once lr * lambda * F > 2,
        which large Fisher entries reach quickly; the implicit (proximal) step
        w <- w* + (w - w*) / (1 + lr * lambda * F) minimises the same objective, equals the
        explicit step to first order, and is stable for every lambda. lambda = 0 leaves w as is.
        """
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        pull = self.optimizer.learning_rate * self.ewc_lambda
        for w, a, f in zip(self.global_variables, self.anchor, self.fisher):
            w.assign(a + (w - a) / (1.0 + pull * f))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {**{m.name: m.result() for m in self.metrics}, "ewc_penalty": 0.5 * self.ewc_lambda * self.ewc_penalty()}


def mlp(input_dim: int, hidden: tuple[int, ...], num_classes: int, seed: int) -> EWCModel:
    """A multilayer perceptron with ReLU hidden layers and logits out, named layer by layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(input_dim,), name="features")
    x = inputs
    for i, width in enumerate(hidden):
        x = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")(x)
    outputs = keras.layers.Dense(num_classes, name="output")(x)
    return EWCModel(inputs=inputs, outputs=outputs)


def recommender(side_dim: int, num_items: int, factors: int, users: int, user_state: bool, seed: int) -> EWCModel:
    """Will this user like this item? Two-class logits (0, s) for rows of side features, then the
    item's id, then the user's device-local slot:

        s = b + w.side + b_item[i] + b_user[u] + <A side + p_u, q_i>

    Item factors q and biases are global; the user's factors p_u and bias b_user[u] are private
    (zero for a user the device has not trained yet: then the profile's taste A side stands in).
    Without `user_state` the model has no private part at all.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(side_dim + 2,), name="features")
    side = inputs[:, :side_dim]
    item = keras.ops.cast(inputs[:, side_dim], "int32")
    small = keras.initializers.RandomNormal(stddev=0.01)
    q = keras.layers.Embedding(num_items, factors, embeddings_initializer=small, name="item_factors")(item)
    score = (keras.layers.Dense(1, name="side")(side)
             + keras.layers.Embedding(num_items, 1, embeddings_initializer="zeros", name="item_bias")(item))
    taste = keras.layers.Dense(factors, use_bias=False, name="side_taste")(side)
    if user_state:
        user = keras.ops.cast(inputs[:, side_dim + 1], "int32")
        taste = taste + keras.layers.Embedding(users, factors, embeddings_initializer="zeros",
                                               name="user_factors")(user)
        score = score + keras.layers.Embedding(users, 1, embeddings_initializer="zeros", name="user_bias")(user)
    score = score + keras.ops.sum(taste * q, axis=-1, keepdims=True)
    return EWCModel(inputs=inputs, outputs=keras.ops.concatenate([keras.ops.zeros_like(score), score], axis=-1))


def model_inputs(x: np.ndarray):
    """What a model is called on: a table of named columns (a structured array, as a task spec's
    rows are) as a dict of its columns, which its inputs are named after; an array as it is."""
    return {name: x[name] for name in x.dtype.names} if x.dtype.names else x


def _class_nll(labels, outputs):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)


def _gaussian_nll(targets, outputs):  # a numeric label's, of unit variance: half the squared error
    return 0.5 * tf.square(targets - outputs[:, 0])


def get_weights(model: keras.Model) -> Weights:
    """The trainable tensors by name (e.g. "hidden_0/kernel"), as float32 copies."""
    return {v.path: np.array(v.numpy(), dtype=np.float32) for v in model.trainable_variables}


def set_weights(model: keras.Model, weights: Weights) -> None:
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])


PER_SAMPLE_BATCH = 256  # per-sample gradients are dense: 256 x an item table of 1,683 x 16 is 28 MB


def fisher_diagonal(model: EWCModel, x: np.ndarray, y: np.ndarray, batch_size: int = 1024,
                    numeric: bool = False) -> Weights:
    """The diagonal empirical Fisher of the global tensors: the mean over samples of each squared
    per-sample gradient of the log-likelihood of the true label (a class's; with `numeric`, a
    number's under unit Gaussian noise), private tensors held as they are. `x` is an array or a
    table (`model_inputs`); `batch_size` is that of the closed form for Dense chains."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    columns = x.dtype.names
    if all(isinstance(layer, keras.layers.Dense) and layer.use_bias for layer in layers) and len(columns or "x") == 1:
        return _dense_chain_fisher(layers, x if columns is None else x[columns[0]], y, batch_size, numeric)
    return _per_sample_fisher(model, x, y, PER_SAMPLE_BATCH, numeric)


def _label_tensor(y: np.ndarray, numeric: bool):
    return tf.convert_to_tensor(y, tf.float32 if numeric else tf.int32)


def _dense_chain_fisher(layers: list, x: np.ndarray, y: np.ndarray, batch_size: int, numeric: bool) -> Weights:
    """The Fisher of a chain of Dense layers (as `mlp` builds), in closed form.

    A sample's kernel gradient is the outer product of the layer's input a and the gradient g of
    its pre-activation, so the summed squares are (a^2)^T (g^2): one batched backward pass and a
    matmul per layer, instead of a backward pass per sample (30-50x faster than
    tf.vectorized_map here). Batches of 1024 take the mnist organization's 500 validation samples
    at once: 5.5 ms against 7.2 in batches of 256.
    """
    variables = [v for layer in layers for v in (layer.kernel, layer.bias)]

    def summed_squared_gradients(xb, yb):  # eager: a few large ops, where tracing would cost more
        inputs, pre_activations = [], []
        with tf.GradientTape() as tape:
            h = xb
            for layer in layers:
                inputs.append(h)
                z = tf.matmul(h, layer.kernel) + layer.bias
                pre_activations.append(z)
                h = layer.activation(z)
            # each sample's loss depends on its own row only: the gradient of the sum holds them all
            nll = tf.reduce_sum((_gaussian_nll if numeric else _class_nll)(yb, h))
        grads = tape.gradient(nll, pre_activations)
        return [part for a, g in zip(inputs, grads)
                for part in (tf.matmul(tf.square(a), tf.square(g), transpose_a=True), tf.reduce_sum(tf.square(g), 0))]

    totals = [np.zeros(v.shape, np.float64) for v in variables]
    for start in range(0, len(x), batch_size):
        xb = tf.convert_to_tensor(x[start:start + batch_size], tf.float32)
        yb = _label_tensor(y[start:start + batch_size], numeric)
        for total, part in zip(totals, summed_squared_gradients(xb, yb)):
            total += part.numpy()
    return {v.path: (t / max(len(x), 1)).astype(np.float32) for v, t in zip(variables, totals)}


def _per_sample_fisher(model: EWCModel, x: np.ndarray, y: np.ndarray, batch_size: int, numeric: bool) -> Weights:
    """The Fisher of any model, from per-sample gradients vectorised over a batch (tf.vectorized_map).

    Every batch has `batch_size` rows, a short last one padded with copies of its first row that
    count for nothing: one input shape, one trace. (Batches of other sizes retrace to an unknown
    batch size, which tf.vectorized_map mis-vectorises for the recommender: a batch of one row
    after a longer one failed in a shape check.)
    """
    variables = model.global_variables
    totals = [np.zeros(v.shape, np.float64) for v in variables]
    summed = _summed_squared_gradients(model, numeric)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        counted = np.arange(batch_size) < len(yb)
        padding = np.zeros(batch_size - len(yb), np.int64)
        rows = np.concatenate([xb, xb[padding]])
        parts = summed(tf.nest.map_structure(tf.convert_to_tensor, model_inputs(rows)),
                       _label_tensor(np.concatenate([yb, yb[padding]]), numeric),
                       tf.convert_to_tensor(counted, tf.float32))
        for total, part in zip(totals, parts):
            total += part.numpy()
    return {v.path: (t / max(len(x), 1)).astype(np.float32) for v, t in zip(variables, totals)}


@functools.cache
def _summed_squared_gradients(model: EWCModel, numeric: bool):
    """A traced function of (x, y, counted) -> per global variable, the sum over the counted
    samples of squared gradients; made once per model, so later rounds reuse its trace."""
    variables = model.global_variables
    nll_of = _gaussian_nll if numeric else _class_nll

    def one(sample):
        xi, yi = sample
        with tf.GradientTape() as tape:
            nll = nll_of(yi[None], model(tf.nest.map_structure(lambda column: column[None], xi)))
        # an embedding's gradient is sparse (the rows the sample uses): made dense to be squared
        return [tf.convert_to_tensor(g) for g in tape.gradient(nll, variables)]

    @tf.function
    def summed(xb, yb, counted):
        return [tf.tensordot(counted, tf.square(g), axes=1) for g in tf.vectorized_map(one, (xb, yb))]

    return summed
