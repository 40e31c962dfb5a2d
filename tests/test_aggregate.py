"""Aggregation: pure NumPy functions over named tensors."""
import numpy as np
import pytest

from processor import aggregate as agg
from processor.rounds import aggregate


def delta(value: float, shape=(3, 2)) -> dict[str, np.ndarray]:
    return {"w": np.full(shape, value, np.float32), "b": np.full((2,), value, np.float32)}


def test_weighted_mean_of_known_deltas_equals_the_hand_computed_mean():
    merged = agg.weighted_mean([(delta(1.0), 10), (delta(4.0), 30), (delta(-2.0), 60)])
    expected = (1.0 * 10 + 4.0 * 30 - 2.0 * 60) / 100  # = 0.1
    np.testing.assert_allclose(merged["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(merged["b"], expected, rtol=1e-6)


def test_streaming_mean_equals_a_direct_mean_over_random_deltas():
    rng = np.random.default_rng(1)
    deltas = [({"w": rng.normal(size=(50, 20)).astype(np.float32)}, int(n)) for n in rng.integers(1, 500, 40)]
    consumed = []

    def stream():
        for d, n in deltas:
            consumed.append(n)
            yield d, n

    merged = agg.weighted_mean(stream())
    weights = np.array([n for _, n in deltas], np.float64)
    direct = np.tensordot(weights / weights.sum(), np.stack([d["w"] for d, _ in deltas]), axes=1)
    np.testing.assert_allclose(merged["w"], direct, rtol=1e-5, atol=1e-6)
    assert len(consumed) == len(deltas)


def test_weighted_mean_refuses_nothing_and_non_positive_counts():
    with pytest.raises(ValueError, match="no deltas"):
        agg.weighted_mean([])
    with pytest.raises(ValueError, match="positive sample count"):
        agg.weighted_mean([(delta(1.0), 0)])


def test_median_and_trimmed_mean_bound_a_crafted_outlier():
    honest = [delta(v) for v in (0.9, 1.0, 1.1, 1.05, 0.95)]
    attacker = delta(1e6)
    plain = agg.weighted_mean([(d, 1) for d in honest + [attacker]])
    assert plain["w"].max() > 1e5  # the attack works on plain FedAvg
    median = agg.coordinate_median(honest + [attacker])
    trimmed = agg.trimmed_mean(honest + [attacker], trim_fraction=0.2)
    for merged in (median, trimmed):
        assert np.all(np.abs(merged["w"] - 1.0) < 0.1)


def test_clipping_bounds_the_norm_and_leaves_short_deltas_alone():
    long = delta(100.0)
    clipped = agg.clip_by_norm(long, 1.0)
    assert agg.l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["w"] / clipped["w"].max(), 1.0)  # direction kept
    short = delta(0.01)
    assert agg.clip_by_norm(short, 1.0) is short


def test_clipped_fedavg_bounds_a_scaled_attack():
    base = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    honest = [(delta(0.01), 100) for _ in range(4)]
    attack = (delta(0.01 * 50), 100)
    clip = agg.l2_norm(delta(0.01)) * 1.5
    unbounded = aggregate(base, honest + [attack])
    bounded = aggregate(base, honest + [attack], clip_norm=clip)
    assert agg.l2_norm(unbounded) > 10 * agg.l2_norm(delta(0.01))
    assert agg.l2_norm(bounded) <= clip


def test_rounds_aggregate_adds_the_merged_delta_to_the_base():
    base = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    merged = aggregate(base, iter([(delta(2.0), 1), (delta(4.0), 1)]))
    np.testing.assert_allclose(merged["w"], 4.0)
    for method in ("median", "trimmed_mean"):
        np.testing.assert_allclose(aggregate(base, [(delta(2.0), 1), (delta(4.0), 1)], method=method)["w"], 4.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(base, [(delta(1.0), 1)], method="mean-ish")
