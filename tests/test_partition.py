"""Partitions among N clients: deterministic, disjoint, covering."""
import numpy as np
import pytest

from processor import partition
from processor.tasks import get_task

LABELS = np.repeat(np.arange(10), 50)


def check_disjoint_and_covering(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "skewed"])
@pytest.mark.parametrize("clients", [1, 2, 5])
def test_partitions_are_deterministic_disjoint_and_cover_the_data(scheme, clients):
    first = partition.split(scheme, LABELS, clients, seed=3, alpha=0.5)
    again = partition.split(scheme, LABELS, clients, seed=3, alpha=0.5)
    assert len(first) == clients
    check_disjoint_and_covering(first, len(LABELS))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_another_seed_gives_another_partition():
    a = partition.split("iid", LABELS, 2, seed=1)
    b = partition.split("iid", LABELS, 2, seed=2)
    assert not np.array_equal(a[0], b[0])


def test_skewed_split_is_the_originals_90_10_split_for_two_clients():
    a, b = partition.skewed(LABELS, 2, seed=0)
    low_a = np.isin(LABELS[a], range(5)).mean()
    low_b = np.isin(LABELS[b], range(5)).mean()
    assert low_a == pytest.approx(0.9, abs=0.01)
    assert low_b == pytest.approx(0.1, abs=0.01)
    classes = np.unique(LABELS)
    np.testing.assert_array_equal(partition.scarce_classes(LABELS[a], classes, share=0.05), np.arange(5, 10))
    np.testing.assert_array_equal(partition.scarce_classes(LABELS[b], classes, share=0.05), np.arange(5))


def test_small_alpha_concentrates_labels():
    parts = partition.dirichlet(LABELS, 5, alpha=0.05, seed=0)
    dominant = [np.bincount(LABELS[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)]
    assert np.mean(dominant) > 0.5


def test_by_user_keeps_each_users_rows_on_one_client():
    task = get_task("interest")
    data = task.data()
    parts = partition.split("by-user", data.y_train, 4, seed=0, groups=data.groups_train)
    check_disjoint_and_covering(parts, len(data.y_train))
    owners = [set(data.groups_train[p]) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not owners[i] & owners[j]


def test_bad_schemes_are_named():
    with pytest.raises(ValueError, match="unknown partition scheme 'zigzag'"):
        partition.split("zigzag", LABELS, 2, seed=0)
    with pytest.raises(ValueError, match="by-user partition needs"):
        get_task("digits").client_data(0, 2, scheme="by-user")
    with pytest.raises(ValueError, match="client id 2 is not in 0..1"):
        get_task("digits").client_data(2, 2)
