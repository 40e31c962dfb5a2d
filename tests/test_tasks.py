"""Tasks: datasets read from inside the installed wheels, fixed held-out sets, metrics."""
from importlib import resources

import numpy as np
import pytest

from processor import rounds
from processor.tasks import get_task, read_movielens


@pytest.mark.parametrize("name, rows, features, classes", [
    ("mnist", 5000, 784, 10), ("digits", 1797, 64, 10), ("interest", 100000, 44, 2)])
def test_tasks_load_real_data_with_disjoint_fixed_holdouts(name, rows, features, classes):
    task = get_task(name)
    data = task.data()
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == rows
    assert data.x_train.shape[1] == data.x_test.shape[1] == features == task.input_dim
    assert set(np.unique(data.y_test)) == set(range(classes))
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert task.arch_id.startswith(f"mlp-{features}-") and task.arch_id.endswith(f"-{classes}")


def test_interest_reads_movielens_from_the_recbole_wheel():
    ratings, users, items = read_movielens(resources.files("recbole") / "dataset_example" / "ml-100k")
    assert ratings.shape == (100000, 3) and len(users) == 943 and len(items) == 1682
    data = get_task("interest").data()
    assert 0.4 < data.y_train.mean() < 0.7  # rating >= 4 is a bit over half the ratings
    assert len(np.unique(data.groups_train)) == 943 - int(0.2 * 943) - int(0.1 * 943)


def test_interest_accepts_a_users_own_copy_in_grouplens_format(tmp_path):
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t0\n"
                                             for u in range(1, 21) for i in range(1, 6)))
    (tmp_path / "u.user").write_text("".join(f"{u}|{20 + u}|{'MF'[u % 2]}|{['writer', 'artist'][u % 2]}|0\n"
                                             for u in range(1, 21)))
    (tmp_path / "u.genre").write_text("Action|0\nComedy|1\n")
    (tmp_path / "u.item").write_text("".join(f"{i}|Film {i}|01-Jan-199{i}||url|{i % 2}|{(i + 1) % 2}\n"
                                             for i in range(1, 6)))
    task = get_task("interest", data_path=tmp_path)
    data = task.data()
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 100
    # The model fits this copy's features (2 occupations, 2 genres), not the bundled dataset's 44.
    assert task.input_dim == data.x_train.shape[1] == 8
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
