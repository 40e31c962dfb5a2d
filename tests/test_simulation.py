"""The single-process simulation, built on the same round steps as the apps."""
import numpy as np
import pytest

from processor import rounds
from processor.simulation import RoundRecord, SimulationConfig, SimulationResult, simulate
from processor.tasks import ITEM_COLUMN, get_task, interest_task
from processor.training import TrainingSettings
from tests.fixtures.movielens import write_copy


def test_three_clients_three_rounds_on_digits_learn_the_task():
    task = get_task("digits")
    seen = []
    result = simulate(task, SimulationConfig(
        num_clients=3, rounds=3, training=TrainingSettings(epochs=5, learning_rate=0.1), seed=0),
                      on_round=seen.append)
    assert [r.round for r in seen] == [1, 2, 3]
    assert result.initial_test["accuracy"] < 0.3
    assert result.accuracy_per_round[-1] > 0.85
    assert all(len(r.clients) == 3 for r in result.rounds)
    assert sum(c.num_samples for c in result.rounds[0].clients) == len(task.data().y_train)


def test_probes_measure_accuracy_before_and_after_local_training():
    task = get_task("digits")
    data = task.data()
    probes = {0: (data.x_test[:50], data.y_test[:50])}
    result = simulate(task, SimulationConfig(
        num_clients=2, rounds=1, training=TrainingSettings(learning_rate=0.1)), probes=probes)
    client0, client1 = result.rounds[0].clients
    assert client0.probe_before is not None and client0.probe_after is not None
    assert client1.probe_before is None


def test_pretraining_on_the_organizations_data_beats_random_weights():
    task = get_task("digits")
    data = task.data()
    random = task.evaluate(rounds.initial_model(task, seed=0), data.x_test, data.y_test)["accuracy"]
    pretrained_weights = rounds.initial_model(task, seed=0, pretrain_epochs=10,
                                              training=TrainingSettings(learning_rate=0.1))
    pretrained = task.evaluate(pretrained_weights, data.x_test, data.y_test)["accuracy"]
    assert pretrained > random + 0.3


def test_the_same_seed_gives_the_same_simulation():
    task = get_task("digits")
    config = SimulationConfig(num_clients=2, rounds=1, training=TrainingSettings(epochs=1, learning_rate=0.1), seed=5)
    a, b = simulate(task, config), simulate(task, config)
    for name in a.final_weights:
        np.testing.assert_array_equal(a.final_weights[name], b.final_weights[name])


def taste_only_copy(folder):
    """Users alike in every feature, each liking all films or none (by the parity of 7u mod 3):
    only what a device learns of its own users can tell them apart."""
    write_copy(folder, users=60, items=15, rating=lambda u, i: 5 if (7 * u) % 3 == 0 else 1,
               profile=lambda u: (30, "F", "writer"))
    return get_task("interest", data_path=folder)


def test_each_device_keeps_its_users_state_between_rounds_and_never_sends_it(tmp_path, monkeypatch):
    task = taste_only_copy(tmp_path)
    calls = []
    original = rounds.local_update

    def spy(*args, private=None, **kwargs):
        result = original(*args, private=private, **kwargs)
        calls.append((private, result))
        return result

    monkeypatch.setattr(rounds, "local_update", spy)
    config = SimulationConfig(num_clients=2, rounds=2, partition="by-user", holdout=True,
                              training=TrainingSettings(epochs=5, learning_rate=0.5))
    result = simulate(task, config)
    first, second = calls[:2], calls[2:]
    assert all(np.all(t == 0) for private, _ in first for t in private.values())  # a new device knows no one
    for (given, _), (_, earlier) in zip(second, first):
        assert all(np.array_equal(given[n], earlier.private[n]) for n in task.private_spec)
        assert np.abs(given["user_bias/embeddings"]).max() > 0
    assert all(set(r.delta) == set(task.spec) for _, r in calls)
    last = result.rounds[-1]
    assert last.federated["devices"] == 2 and len(last.clients) == 2
    # pooled, the held-out rows' accuracy is the reports' sample-weighted one
    assert last.pooled["accuracy"] == pytest.approx(last.federated["accuracy"])


def test_private_user_state_tells_users_apart_where_the_global_model_cannot(tmp_path):
    task = taste_only_copy(tmp_path)
    without = interest_task(task.data, task.input_dim - 2, task.num_items, user_state=False)
    config = SimulationConfig(num_clients=2, rounds=3, partition="by-user", holdout=True,
                              training=TrainingSettings(epochs=5, learning_rate=0.5))
    with_state = simulate(task, config).rounds[-1]
    without_state = simulate(without, config).rounds[-1]
    # held-out ratings are each user's latest: known from its earlier ones, by its own device only
    assert with_state.federated["accuracy"] == 1.0 and with_state.pooled["auc"] == 1.0
    assert without_state.federated["accuracy"] < 0.75
    assert with_state.test["auc"] == without_state.test["auc"] == 0.5  # the panel's users are new to everyone


def test_the_continual_schedule_deals_the_periods_in_time_order(tmp_path, monkeypatch):
    # every user rates every film, films in id order over time: a row's film id tells its time
    write_copy(tmp_path, users=12, items=9, rating=lambda u, i: 5 if (u + i) % 2 else 1,
               profile=lambda u: (20 + u, "M", "writer"))
    task = get_task("interest", data_path=tmp_path)
    period, films = task.periods(3), task.data().x_train[:, ITEM_COLUMN]
    assert np.all(np.diff(period) >= 0) and np.bincount(period).min() >= len(period) // 3
    for p in range(2):
        assert films[period == p].max() <= films[period == p + 1].min()

    trained = []
    original = rounds.local_update

    def spy(task, base_weights, fisher, x, *args, **kwargs):
        trained.append(x[:, ITEM_COLUMN])
        return original(task, base_weights, fisher, x, *args, **kwargs)

    monkeypatch.setattr(rounds, "local_update", spy)
    config = SimulationConfig(num_clients=2, rounds=6, periods=3, partition="by-user", holdout=True,
                              training=TrainingSettings(learning_rate=0.5))
    result = simulate(task, config)
    assert [r.period for r in result.rounds] == [config.period_of_round(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert len(trained) == 12  # both clients hold ratings of every period
    for call, seen in enumerate(trained):
        p = call // 4
        assert films[period == p].min() <= seen.min() and seen.max() <= films[period == p].max()
    assert [len(r.per_period) for r in result.rounds] == [1, 1, 2, 2, 3, 3]


def test_mnist_like_tasks_bring_new_classes_in_each_period():
    task = get_task("digits")
    np.testing.assert_array_equal(task.periods(5), task.data().y_train // 2)
    with pytest.raises(ValueError, match="cannot cover"):
        SimulationConfig(rounds=2, periods=3)


def test_forgetting_is_the_fall_on_each_earlier_period_from_the_end_of_its_rounds():
    def record(round_id, period, accuracies):
        return RoundRecord(round_id, {}, period=period, per_period=[{"accuracy": a} for a in accuracies])

    result = SimulationResult({}, [record(1, 0, [0.5]), record(2, 0, [0.9]), record(3, 1, [0.6, 0.8]),
                                   record(4, 2, [0.7, 0.5, 0.9])], {})
    assert result.forgetting("accuracy") == pytest.approx(((0.9 - 0.7) + (0.8 - 0.5)) / 2)
    with pytest.raises(ValueError, match="two periods"):
        SimulationResult({}, [record(1, 0, [0.5])], {}).forgetting("accuracy")
