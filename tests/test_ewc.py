"""EWC: the penalty's pull towards the anchor, the vectorised Fisher, no retracing between rounds."""
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf

from processor import rounds
from processor.aggregate import l2_norm
from processor.ewc import EWCModel, fisher_diagonal, get_weights, mlp, recommender, set_weights
from processor.tasks import Task, get_task, load_digits
from processor.training import TrainingSettings

TASK = get_task("digits")
TWO_EPOCHS = TrainingSettings(epochs=2, learning_rate=0.1)


@pytest.fixture(scope="module")
def base():
    return rounds.make_base(TASK, rounds.initial_model(TASK, seed=1))


def client_shard():
    return TASK.client_data(0, 3, scheme="skewed", seed=0)


def test_huge_lambda_keeps_weights_at_the_anchor_while_lambda_zero_moves_them(base):
    x, y = client_shard()
    # The Fisher is tiny on some coordinates; a uniform importance makes "near" meaningful for all.
    uniform = {n: np.ones_like(f) for n, f in base.fisher.items()}
    free = rounds.local_update(TASK, base.weights, uniform, x, y, TWO_EPOCHS, seed=0)
    held = rounds.local_update(TASK, base.weights, uniform, x, y, replace(TWO_EPOCHS, ewc_lambda=1e4), seed=0)
    assert l2_norm(free.delta) > 0.5
    assert l2_norm(held.delta) < 0.02 * l2_norm(free.delta)
    assert free.metrics_after["accuracy"] > free.metrics_before["accuracy"] + 0.2


def test_ewc_with_the_fisher_moves_less_than_plain_training(base):
    x, y = client_shard()
    plain = rounds.local_update(TASK, base.weights, base.fisher, x, y, TWO_EPOCHS, seed=0)
    ewc = rounds.local_update(TASK, base.weights, base.fisher, x, y, replace(TWO_EPOCHS, ewc_lambda=500.0), seed=0)
    weighted = lambda d: sum(float(np.sum(base.fisher[n] * d[n] ** 2)) for n in d)  # noqa: E731
    assert weighted(ewc.delta) < weighted(plain.delta)


def test_vectorised_fisher_equals_a_per_sample_reference_on_a_tiny_model():
    model = mlp(4, (3,), 3, seed=7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=37)
    fast = fisher_diagonal(model, x, y, batch_size=16)  # three batches, the last partial

    reference = {v.path: np.zeros(v.shape) for v in model.trainable_variables}
    for xi, yi in zip(x, y):  # the slow reference the vectorised version must match
        with tf.GradientTape() as tape:
            logits = model(xi[None], training=False)
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[int(yi)], logits=logits)
        for v, g in zip(model.trainable_variables, tape.gradient(nll, model.trainable_variables)):
            reference[v.path] += g.numpy() ** 2 / len(x)
    assert set(fast) == set(reference)
    for name in fast:
        np.testing.assert_allclose(fast[name], reference[name], rtol=1e-4, atol=1e-7)
    assert all(np.all(f >= 0) for f in fast.values())


def tiny_recommender_rows(rng, rows: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([rng.normal(size=(rows, 3)), rng.integers(0, 5, rows), rng.integers(0, 4, rows)])
    return x.astype(np.float32), rng.integers(0, 2, rows)


def looped_fisher(model, x, y) -> dict:
    """The slow reference: one backward pass per sample, the global tensors' squared gradients."""
    shared = model.global_variables
    reference = {v.path: np.zeros(v.shape) for v in shared}
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[int(yi)], logits=model(xi[None]))
        for v, g in zip(shared, tape.gradient(nll, shared)):
            reference[v.path] += tf.convert_to_tensor(g).numpy() ** 2 / len(x)
    return reference


def test_a_recommenders_fisher_from_vectorised_per_sample_gradients_equals_a_loop():
    model = recommender(side_dim=3, num_items=5, factors=2, users=4, user_state=True, seed=7)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # a device's trained user state, so every product term counts
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    x, y = tiny_recommender_rows(rng, 300)  # two batches of PER_SAMPLE_BATCH, the last partial
    fast = fisher_diagonal(model, x, y)

    reference = looped_fisher(model, x, y)
    assert set(fast) == set(reference) == {"side/kernel", "side/bias", "item_bias/embeddings",
                                           "item_factors/embeddings", "side_taste/kernel"}
    for name in fast:
        np.testing.assert_allclose(fast[name], reference[name], rtol=1e-4, atol=1e-7)


def test_a_recommenders_fisher_of_any_number_of_rows_after_another_equals_a_loop():
    """A batch of one row after a longer set: once failed in tf.vectorized_map (a retrace)."""
    model = recommender(side_dim=3, num_items=5, factors=2, users=4, user_state=True, seed=7)
    rng = np.random.default_rng(2)
    fisher_diagonal(model, *tiny_recommender_rows(rng, 300))
    x, y = tiny_recommender_rows(rng, 257)  # a full batch and one row
    fast = fisher_diagonal(model, x, y)
    reference = looped_fisher(model, x, y)
    for name in fast:
        np.testing.assert_allclose(fast[name], reference[name], rtol=1e-4, atol=1e-7)


def test_the_penalty_holds_the_global_tensors_and_leaves_the_users_state_free():
    model = recommender(side_dim=3, num_items=5, factors=2, users=4, user_state=True, seed=7)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = tiny_recommender_rows(np.random.default_rng(1), 64)
    start = get_weights(model)
    shared = {v.path for v in model.global_variables}
    model.set_anchor({n: start[n] for n in shared}, {n: np.ones_like(start[n]) for n in shared}, 1e5)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    moved = {n: float(np.abs(w - start[n]).max()) for n, w in get_weights(model).items()}
    assert max(moved[n] for n in shared) < 1e-3
    assert moved["user_bias/embeddings"] > 0.1 and moved["user_factors/embeddings"] > 1e-3


def test_a_new_round_reassigns_variables_without_retracing(monkeypatch):
    traces = []
    original = EWCModel.train_step

    def counting_train_step(self, data):
        traces.append(1)  # runs in Python only while TensorFlow traces the step
        return original(self, data)

    monkeypatch.setattr(EWCModel, "train_step", counting_train_step)
    task = Task("digits", load_digits, 64, (32,), 10)  # a fresh working model, traced in this test
    x, y = task.client_data(0, 2, seed=0)
    weights = rounds.initial_model(task, seed=0)
    for round_id, lam in enumerate([0.0, 10.0, 100.0]):
        base = rounds.make_base(task, weights)
        training = TrainingSettings(learning_rate=0.1, ewc_lambda=lam)
        update = rounds.local_update(task, base.weights, base.fisher, x, y, training, seed=round_id)
        weights = rounds.aggregate(weights, [(update.delta, len(y))])
        if round_id == 0:
            traced_in_first_round = len(traces)
    assert traced_in_first_round >= 1
    assert len(traces) == traced_in_first_round


def test_weights_dictionary_round_trip(base):
    model = TASK.build_model(seed=3)
    set_weights(model, base.weights)
    for name, tensor in get_weights(model).items():
        np.testing.assert_array_equal(tensor, base.weights[name])


def test_the_batch_order_comes_from_the_seed_alone(base):
    """Clients in separate processes and in one process must train alike: whatever else has set
    TensorFlow's global seed, the same seed gives the same weights, and another seed other ones."""
    x, y = client_shard()

    def trained(seed: int, global_seed: int) -> dict:
        keras.utils.set_random_seed(global_seed)  # what building a model or other code may do
        return rounds.train(TASK, base.weights, base.fisher, x, y, replace(TWO_EPOCHS, batch_size=16),
                            seed=seed)

    first = trained(seed=5, global_seed=0)
    again = trained(seed=5, global_seed=123)
    other = trained(seed=6, global_seed=0)
    assert all(np.array_equal(first[n], again[n]) for n in first)
    assert not all(np.array_equal(first[n], other[n]) for n in first)


def test_every_batch_and_epoch_reports_its_progress(base):
    x, y = client_shard()
    reports = []
    rounds.train(TASK, base.weights, base.fisher, x, y, replace(TWO_EPOCHS, epochs=3, batch_size=16), seed=0,
                 progress=reports.append)
    batches = -(-len(y) // 16)
    epoch_ends = [r for r in reports if "loss" in r]
    assert [(r["epoch"], r["epochs"], r["batch"]) for r in epoch_ends] == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]
    # every batch of every epoch: epochs done so far, and batches done in the current one (Keras may
    # report the batches of an epoch from worker threads, but all of them before the epoch's end)
    ends = [i for i, r in enumerate(reports) if "loss" in r]
    for epoch, (start, end) in enumerate(zip([-1, *ends], ends)):
        assert sorted((r["epoch"], r["batch"]) for r in reports[start + 1:end]) == [
            (epoch, batch) for batch in range(1, batches + 1)]
    assert all(r["batches"] == batches for r in reports)
