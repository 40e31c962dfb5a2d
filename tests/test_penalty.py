"""The penalties local training may take: FedProx is EWC with a uniform Fisher, FedCurv's one
quadratic is the sum of the other clients' quadratics, lambda is scale-free."""
from dataclasses import replace

import numpy as np
import pytest

from processor import penalty, rounds
from processor.aggregate import l2_norm
from processor.penalty import SentStatistics
from processor.simulation import SimulationConfig, simulate
from processor.tasks import get_task
from processor.training import TrainingSettings

TASK = get_task("digits")
PLAN = TrainingSettings(epochs=2, learning_rate=0.1)


@pytest.fixture(scope="module")
def base():
    return rounds.make_base(TASK, rounds.initial_model(TASK, seed=1))


def test_fedprox_is_the_ewc_step_with_a_unit_fisher(base):
    x, y = TASK.client_data(0, 3, scheme="skewed", seed=0)
    ones = {n: np.ones_like(f) for n, f in base.fisher.items()}
    prox = rounds.local_update(TASK, base.weights, base.fisher, x, y, replace(PLAN, regularizer="fedprox",
                                                                              ewc_lambda=0.5), seed=0)
    ewc = rounds.local_update(TASK, base.weights, ones, x, y, replace(PLAN, ewc_lambda=0.5), seed=0)
    free = rounds.local_update(TASK, base.weights, base.fisher, x, y, PLAN, seed=0)
    for name in prox.delta:
        np.testing.assert_array_equal(prox.delta[name], ewc.delta[name])
    assert l2_norm(prox.delta) < 0.8 * l2_norm(free.delta)


def random_weights(rng, scale=1.0) -> dict:
    return {"a/kernel": (scale * rng.normal(size=(3, 2))).astype(np.float32),
            "a/bias": (scale * rng.normal(size=2)).astype(np.float32)}


def test_fedcurvs_one_quadratic_is_the_sum_of_the_other_clients_quadratics():
    rng = np.random.default_rng(0)
    fishers = [{n: np.abs(t) for n, t in random_weights(rng).items()} for _ in range(4)]
    for f in fishers:
        f["a/bias"][0] = 0.0  # a coordinate one client's data does not touch
    fishers = [penalty.scale_free(f) for f in fishers]  # as each client sends it
    trained = [random_weights(rng) for _ in range(4)]
    zero = {n: np.zeros_like(t) for n, t in trained[0].items()}
    stats = [penalty.contribution(SentStatistics(1, zero, w, f)) for f, w in zip(fishers, trained)]
    own = 1
    others = penalty.without(penalty.summed(stats), stats[own])
    anchor, importance = penalty.quadratic("fedcurv", random_weights(rng), fishers[0], others)
    scale = importance["a/kernel"].ravel()[0] / others.fisher["a/kernel"].ravel()[0]  # the mean's normaliser

    def each(w):  # sum over j != own of F_j (w - w_j)^2: its value and its gradient
        pairs = [(fishers[j], trained[j]) for j in range(4) if j != own]
        value = sum(float(np.sum(f[n] * (w[n] - t[n]) ** 2)) for f, t in pairs for n in w)
        return value, {n: sum(2 * f[n] * (w[n] - t[n]) for f, t in pairs) for n in w}

    def combined(w):
        value = sum(float(np.sum(importance[n] * (w[n] - anchor[n]) ** 2)) for n in w) / scale
        return value, {n: 2 * importance[n] * (w[n] - anchor[n]) / scale for n in w}

    points = [random_weights(rng, 3.0) for _ in range(2)]
    for w in points:
        for name in w:
            np.testing.assert_allclose(combined(w)[1][name], each(w)[1][name], rtol=1e-4, atol=1e-5)
    # the values differ by one constant, the same wherever w is
    offsets = [each(w)[0] - combined(w)[0] for w in points]
    assert offsets[0] == pytest.approx(offsets[1], rel=1e-4, abs=1e-4)


def test_fedcurv_pulls_nothing_before_the_clients_have_sent_statistics():
    weights = random_weights(np.random.default_rng(1))
    anchor, importance = penalty.quadratic("fedcurv", weights, weights, None)
    assert anchor is weights and all(not np.any(t) for t in importance.values())


def test_the_fisher_is_scaled_to_mean_one_so_lambda_means_the_same_for_every_regularizer():
    fisher = {"a": np.array([0.0, 2e-6, 4e-6], np.float32), "b": np.array([6e-6], np.float32)}
    scaled = penalty.scale_free(fisher)
    np.testing.assert_allclose(np.concatenate([scaled["a"], scaled["b"]]), [0.0, 2 / 3, 4 / 3, 2.0], rtol=1e-6)
    zero = {"a": np.zeros(3, np.float32)}
    assert not np.any(penalty.scale_free(zero)["a"])
    with pytest.raises(ValueError, match="unknown regularizer"):
        penalty.quadratic("l2", zero, zero)


def test_in_a_fedcurv_simulation_each_client_is_pulled_towards_the_others_of_the_last_round(monkeypatch):
    calls = []
    original = rounds.local_update

    def spy(task, base_weights, *args, others=None, **kwargs):
        result = original(task, base_weights, *args, others=others, **kwargs)
        calls.append((others, SentStatistics(len(calls) // 3 + 1, base_weights, result.delta, result.fisher)))
        return result

    monkeypatch.setattr(rounds, "local_update", spy)
    plan = replace(PLAN, epochs=1, regularizer="fedcurv", ewc_lambda=0.1)
    simulate(TASK, SimulationConfig(num_clients=3, rounds=2, training=plan, seed=0))
    first, second = calls[:3], calls[3:]
    assert all(others is None for others, _ in first)
    total = penalty.summed(penalty.contribution(sent) for _, sent in first)
    for k, (others, _) in enumerate(second):
        expected = penalty.without(total, penalty.contribution(first[k][1]))
        for name in expected.fisher:
            np.testing.assert_allclose(others.fisher[name], expected.fisher[name], rtol=1e-6)
            np.testing.assert_allclose(others.pull[name], expected.pull[name], rtol=1e-6, atol=1e-9)
        # client k's own Fisher is the base's on its own rows: not in what pulls it
        assert not np.allclose(others.fisher["output/kernel"], total.fisher["output/kernel"])


def test_a_clients_part_is_its_fisher_at_mean_one_and_that_fisher_times_its_weights_as_merged(base):
    x, y = TASK.client_data(1, 3, seed=0)
    result = rounds.local_update(TASK, base.weights, base.fisher, x, y, replace(PLAN, regularizer="fedcurv"), seed=0)
    own = penalty.scale_free(rounds.fisher_of(TASK, base.weights, x, y))
    for name in own:
        np.testing.assert_allclose(result.fisher[name], own[name], rtol=1e-6)
    # however large a Fisher a client claims, its part weighs as much as any other's
    claimed = {n: 1e6 * f for n, f in result.fisher.items()}
    part = penalty.contribution(SentStatistics(1, base.weights, result.delta, claimed), scale=0.5)
    for name in own:
        np.testing.assert_allclose(part.fisher[name], own[name], rtol=1e-5)
        merged = base.weights[name] + 0.5 * result.delta[name]  # the delta as the merge clipped it
        np.testing.assert_allclose(part.pull[name], own[name] * merged, rtol=1e-4, atol=1e-9)
    plain = rounds.local_update(TASK, base.weights, base.fisher, x, y, PLAN, seed=0)
    assert plain.fisher is None


def test_a_client_takes_its_own_part_out_of_the_published_statistics_only_when_they_hold_it():
    rng = np.random.default_rng(2)
    zero = {n: np.zeros_like(t) for n, t in random_weights(rng).items()}
    sent = {c: SentStatistics(4, zero, random_weights(rng), penalty.scale_free(
        {n: np.abs(t) for n, t in random_weights(rng).items()})) for c in ("0xa", "0xb", "0xc")}
    published = penalty.round_curvature(4, ((c, s, 1.0 if c != "0xb" else 0.25) for c, s in sent.items()))
    assert published.scales == {"0xa": 1.0, "0xb": 0.25, "0xc": 1.0}
    others = penalty.others_for(published, "0xB", sent["0xb"])  # its part as merged: scaled by 0.25
    expected = penalty.summed([penalty.contribution(sent["0xa"]), penalty.contribution(sent["0xc"])])
    for name in expected.fisher:
        np.testing.assert_allclose(others.fisher[name], expected.fisher[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(others.pull[name], expected.pull[name], rtol=1e-4, atol=1e-5)
    assert penalty.others_for(published, "0xd", None) is published.total  # not in it: all of it pulls
    assert penalty.others_for(published, "0xa", replace(sent["0xa"], round_id=3)) is published.total
    assert penalty.others_for(None, "0xa", sent["0xa"]) is None
    assert penalty.round_curvature(5, []) is None
