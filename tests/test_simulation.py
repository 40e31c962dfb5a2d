"""The single-process simulation, built on the same round steps as the apps."""
import numpy as np

from processor import rounds
from processor.simulation import SimulationConfig, simulate
from processor.tasks import get_task
from processor.training import TrainingSettings


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
