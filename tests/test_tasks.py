"""Tasks: datasets read from inside the installed wheels, fixed held-out sets, metrics."""
from importlib import resources

import numpy as np
import pytest

from processor import rounds
from processor.tasks import ITEM_COLUMN, USER_COLUMN, RecommenderTask, get_task, latest_split, read_movielens
from tests.fixtures.movielens import write_copy


@pytest.mark.parametrize("name, rows, features, classes, arch", [
    ("mnist", 5000, 784, 10, "mlp-784-128-10"), ("digits", 1797, 64, 10, "mlp-64-32-10")])
def test_tasks_load_real_data_with_disjoint_fixed_holdouts(name, rows, features, classes, arch):
    task = get_task(name)
    data = task.data()
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == rows
    assert data.x_train.shape[1] == data.x_test.shape[1] == features == task.input_dim
    assert set(np.unique(data.y_test)) == set(range(classes))
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert task.arch_id == arch and task.private_spec == {}


def test_interest_reads_movielens_from_the_recbole_wheel():
    ratings, users, items = read_movielens(resources.files("recbole") / "dataset_example" / "ml-100k")
    assert ratings.shape == (100000, 4) and len(users) == 943 and len(items) == 1682
    task = get_task("interest")
    data = task.data()
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 100000
    assert 0.4 < data.y_train.mean() < 0.7  # rating >= 4 is a bit over half the ratings
    assert len(np.unique(data.groups_train)) == 943 - int(0.2 * 943) - int(0.1 * 943)
    # side features in [0, 1], then the item's id; the user slot is the device's to number
    side = data.x_train[:, :ITEM_COLUMN]
    assert side.shape[1] == 44 and 0.0 <= side.min() and side.max() <= 1.0
    assert set(np.unique(data.x_train[:, ITEM_COLUMN])) <= set(range(1, 1683))
    assert np.all(data.x_train[:, USER_COLUMN] == 0)
    assert task.arch_id == "rec-44-1683-16-u1024"


def test_interest_rows_are_in_rating_order_and_a_device_numbers_its_own_users():
    ratings, _, _ = read_movielens(resources.files("recbole") / "dataset_example" / "ml-100k")
    task = get_task("interest")
    data = task.data()
    # every user's rows in the order that user rated (the bundled file is not in time order)
    own = ratings[ratings[:, 0] == data.groups_train[0]]
    assert np.any(np.diff(own[:, 3]) < 0)
    np.testing.assert_array_equal(data.x_train[data.groups_train == data.groups_train[0], ITEM_COLUMN],
                                  own[np.argsort(own[:, 3], kind="stable"), 1])
    x, _ = task.client_data(3, 20)
    slots = x[:, USER_COLUMN]
    assert set(np.unique(slots)) == set(range(int(slots.max()) + 1)) and slots.max() < task.users
    small = RecommenderTask("interest", task.data, task.input_dim, (), 2, "by-user", num_items=task.num_items, users=40)
    assert small.client_data(3, 20)[0].shape == x.shape  # 33 users fit 40 slots; 661 do not
    with pytest.raises(ValueError, match="a device holds 661 users, more than its private table's 40"):
        small.client_data(0, 1)


def test_a_recommender_device_holds_out_each_users_latest_fifth():
    users = np.array([0, 1, 0, 0, 1, 0, 0, 2, 1, 1, 1])
    train, held = latest_split(users, 0.2)
    assert list(held) == [6, 10]  # user 0's last of 5, user 1's last of 5; user 2's only row trains
    assert sorted([*train, *held]) == list(range(len(users)))
    assert list(latest_split(np.array([4, 4, 4, 4, 4, 4, 4, 4]), 0.2)[1]) == [6, 7]


def test_interest_accepts_a_users_own_copy_in_grouplens_format(tmp_path):
    write_copy(tmp_path, users=20, items=5, rating=lambda u, i: (u + i) % 5 + 1,
               profile=lambda u: (20 + u, "MF"[u % 2], ["writer", "artist"][u % 2]))
    task = get_task("interest", data_path=tmp_path)
    data = task.data()
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 100
    # The model fits this copy's features (2 occupations, 2 genres) and its 5 items, not the bundled dataset's.
    assert task.input_dim == data.x_train.shape[1] == 8 + 2 and task.arch_id == "rec-8-6-16-u1024"
    weights = rounds.initial_model(task)
    predicted = task.logits(weights, data.x_test).argmax(axis=1)
    assert task.evaluate(weights, data.x_test, data.y_test)["accuracy"] == pytest.approx(
        np.mean(predicted == data.y_test))
    with pytest.raises(FileNotFoundError, match="neither ml-100k.inter"):
        get_task("interest", data_path=tmp_path / "missing").data()


def test_evaluate_reports_accuracy_loss_and_auc_for_interest():
    task = get_task("interest")
    data = task.data()
    metrics = task.evaluate(rounds.initial_model(task), data.x_test[:2000], data.y_test[:2000])
    assert set(metrics) == {"accuracy", "loss", "auc"}
    # AUC is the chance that an interested pair scores above an uninterested one (Mann-Whitney)
    logits = task.logits(rounds.initial_model(task), data.x_test[:2000]).astype(np.float64)
    score, y = logits[:, 1] - logits[:, 0], data.y_test[:2000]
    positive, negative = score[y == 1], score[y == 0]
    wins = (positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean()
    assert metrics["auc"] == pytest.approx(wins, abs=1e-9)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        get_task("cifar")
