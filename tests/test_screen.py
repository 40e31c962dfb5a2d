"""The organization's check-and-merge (processor.screen): a verdict per update, bounded influence."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save

from processor import aggregate as agg
from processor import codec, penalty, screen
from processor.penalty import SentStatistics
from processor.screen import MergePolicy, Received, merge_round
from processor.tasks import get_task

TASK = get_task("digits")
BASE_CID = "bafkreibase"
ROUND = 3
PLAIN = screen.policy_for("none")


def address(k: int) -> str:
    return f"0x{k + 1:040x}"


def base_weights() -> dict:
    return {n: np.zeros(s, np.float32) for n, s in TASK.spec.items()}


def honest_delta(k: int, scale: float = 0.1) -> dict:
    """Deltas that share a common direction (as honest ones do) plus their own noise."""
    common, own = np.random.default_rng(0), np.random.default_rng(k + 1)
    return {n: ((common.normal(size=s) + 0.5 * own.normal(size=s)) * scale).astype(np.float32)
            for n, s in TASK.spec.items()}


def received(k: int, delta: dict, num_samples: int = 100, **metadata) -> Received:
    fields = {"round_id": ROUND, "base_cid": BASE_CID, "num_samples": num_samples, "client": address(k), **metadata}
    return Received(address(k), num_samples, codec.encode_delta(TASK, delta, **fields))


def test_plain_policy_is_sample_weighted_fedavg():
    deltas = [honest_delta(k) for k in range(3)]
    merge = merge_round(TASK, base_weights(), [received(k, d, 10 * (k + 1)) for k, d in enumerate(deltas)],
                        ROUND, BASE_CID, PLAIN)
    expected = agg.weighted_mean([(d, 10 * (k + 1)) for k, d in enumerate(deltas)])
    for name in TASK.spec:
        np.testing.assert_allclose(merge.weights[name], expected[name], rtol=1e-5, atol=1e-7)
    assert merge.accepted == 3
    assert merge.verdicts[address(2)].weight == 30 and merge.verdicts[address(2)].norm == pytest.approx(
        agg.l2_norm(deltas[2]))


def test_every_update_gets_a_verdict_and_bad_ones_never_fail_the_merge():
    updates = [received(0, honest_delta(0)), received(1, honest_delta(1)), received(2, honest_delta(2)),
               Received(address(3), 100, fetch_error="fetching took more than 2 s"),
               Received(address(4), 100, b"not safetensors at all"),
               received(5, honest_delta(5), num_samples=100, round_id=ROUND + 1),
               Received(address(6), 100, received(7, honest_delta(6)).data)]  # another client's file
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID)
    assert set(merge.verdicts) == {u.client for u in updates}
    assert merge.accepted == 3
    reasons = {client: v.reason for client, v in merge.verdicts.items()}
    assert reasons[address(3)] == "fetching took more than 2 s"
    assert "not a safetensors file" in reasons[address(4)]
    assert f"for round {ROUND + 1}, expected round {ROUND}" in reasons[address(5)]
    assert f"names client '{address(7)}', but {address(6)} submitted it" in reasons[address(6)]


def test_a_sample_count_that_disagrees_with_the_chain_is_rejected():
    update = received(0, honest_delta(0), num_samples=100)
    merge = merge_round(TASK, base_weights(), [Received(update.client, 101, update.data)], ROUND, BASE_CID)
    assert merge.weights is None
    assert merge.verdicts[address(0)].reason == "the update claims 100 samples, the chain records 101"


def test_an_unexpected_failure_in_the_checks_is_logged_and_becomes_the_verdict(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a defect")

    updates = [received(k, honest_delta(k)) for k in range(3)]
    real = codec.decode_delta
    monkeypatch.setattr(codec, "decode_delta", lambda task, data, **kw: broken() if data == updates[1].data
                        else real(task, data, **kw))
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID)
    assert merge.accepted == 2
    assert merge.verdicts[address(1)].reason == "the update could not be checked (RuntimeError: a defect)"
    assert "checking the update of" in caplog.text


def test_weights_are_capped_at_the_median_sample_count():
    assert screen.capped_weights([10, 20, 30, 2**63], 1.0) == [10, 20, 25, 25]
    assert screen.capped_weights([10, 20, 30], 2.0) == [10, 20, 30]
    assert screen.capped_weights([10, 20, 30], None) == [10, 20, 30]
    updates = [received(k, honest_delta(k), n) for k, n in enumerate([100, 120, 110, 1_000_000])]
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID, MergePolicy(cosine_weighting=False))
    assert [merge.verdicts[address(k)].weight for k in range(4)] == [100, 115, 110, 115]


def test_deltas_are_clipped_to_the_median_norm_and_the_far_too_long_refused():
    deltas = [honest_delta(k) for k in range(4)]
    scaled = {n: t * 5 for n, t in honest_delta(4).items()}  # 5x: merged, but only as long as the median
    huge = {n: t * 50 for n, t in honest_delta(5).items()}  # beyond 10x the median: refused
    updates = [received(k, d) for k, d in enumerate(deltas)] + [received(4, scaled), received(5, huge)]
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID, MergePolicy(cosine_weighting=False))
    norms = [agg.l2_norm(d) for d in [*deltas, scaled]]
    median = float(np.median([*norms, agg.l2_norm(huge)]))
    assert not merge.verdicts[address(5)].accepted
    assert "exceeds 10 times the round's median" in merge.verdicts[address(5)].reason
    assert merge.verdicts[address(4)].accepted
    clip = float(np.median(norms))
    expected = agg.weighted_mean([(agg.clip_by_norm(d, clip), 100) for d in [*deltas, scaled]])
    for name in TASK.spec:
        np.testing.assert_allclose(merge.weights[name], expected[name], rtol=1e-5, atol=1e-7)
    assert median > clip  # the median that bounds rejection counts the refused delta too


def test_a_delta_pointing_away_from_the_consensus_is_refused():
    deltas = [honest_delta(k) for k in range(4)]
    flipped = {n: -np.mean([d[n] for d in deltas], axis=0) for n in TASK.spec}
    merge = merge_round(TASK, base_weights(), [*(received(k, d) for k, d in enumerate(deltas)),
                                               received(4, flipped)], ROUND, BASE_CID)
    assert merge.accepted == 4
    assert "points away from the round's consensus" in merge.verdicts[address(4)].reason


def test_when_every_update_is_rejected_there_is_no_merged_model():
    merge = merge_round(TASK, base_weights(), [Received(address(0), 1, b"")], ROUND, BASE_CID)
    assert merge.weights is None and merge.accepted == 0 and not merge.verdicts[address(0)].accepted


def test_norm_messages_never_show_two_equal_numbers():
    assert screen.compared(1000.0001, 1000.0) == ("1000.0001", "1000")
    assert screen.compared(2.5, 1.0) == ("2.5", "1")
    delta = {n: np.full(s, 0, np.float32) for n, s in TASK.spec.items()}
    first = next(iter(TASK.spec))
    delta[first].flat[0] = 1000.0001  # its norm is just over the bound
    merge = merge_round(TASK, base_weights(), [received(0, delta)], ROUND, BASE_CID,
                        MergePolicy(max_norm=1000.0))
    assert merge.verdicts[address(0)].reason == "the delta's L2 norm 1000.0001 exceeds the bound 1000"


@pytest.mark.parametrize("field, value", [("weight_multiple", 0), ("clip_multiple", -1.0),
                                          ("reject_multiple", float("nan")), ("aggregation", "mean")])
def test_a_policy_with_impossible_settings_is_refused(field, value):
    with pytest.raises(ValueError, match=field if field != "aggregation" else "unknown aggregation"):
        MergePolicy(**{field: value})


def test_weights_are_scaled_by_each_deltas_cosine_with_the_consensus():
    deltas = [honest_delta(k) for k in range(3)]
    sideways = {n: np.random.default_rng(50).normal(size=s).astype(np.float32) * 0.1 for n, s in TASK.spec.items()}
    updates = [received(k, d) for k, d in enumerate([*deltas, sideways])]
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID)
    consensus = agg.coordinate_median([*deltas, sideways])
    for k, delta in enumerate([*deltas, sideways]):
        expected = max(1, round(100 * max(0.0, agg.cosine(delta, consensus))))
        assert merge.verdicts[address(k)].weight == expected
    assert merge.verdicts[address(3)].weight < min(merge.verdicts[address(k)].weight for k in range(3)) / 2


def test_an_update_that_carries_private_user_state_is_refused():
    interest = get_task("interest")
    base = {n: np.zeros(s, np.float32) for n, s in interest.spec.items()}
    delta = {n: np.full(s, 0.01, np.float32) for n, s in interest.spec.items()}
    fields = {"round_id": ROUND, "base_cid": BASE_CID, "num_samples": 100}
    honest = [Received(address(k), 100, codec.encode_delta(interest, delta, client=address(k), **fields))
              for k in range(3)]
    leaking = {f"delta/{n}": t for n, t in delta.items()}
    leaking["delta/user_bias/embeddings"] = np.ones(interest.private_spec["user_bias/embeddings"], np.float32)
    metadata = {"format": codec.FORMAT, "kind": "delta", "task": "interest", "arch": interest.arch_id,
                "round": str(ROUND), "base_cid": BASE_CID, "num_samples": "100", "client": address(3)}
    merge = merge_round(interest, base, [*honest, Received(address(3), 100, save(leaking, metadata=metadata))],
                        ROUND, BASE_CID)
    assert merge.accepted == 3
    assert "private tensor(s) delta/user_bias/embeddings" in merge.verdicts[address(3)].reason
    assert set(merge.weights) == set(interest.spec)


def test_a_fedcurv_merge_sums_the_merged_updates_statistics_each_delta_as_it_was_clipped():
    rng = np.random.default_rng(7)
    fishers = [{n: np.abs(rng.normal(size=s)).astype(np.float32) for n, s in TASK.spec.items()} for _ in range(4)]
    deltas = [honest_delta(k, scale=0.1 * (k + 1)) for k in range(4)]
    updates = [received(k, d, fisher=f) for k, (d, f) in enumerate(zip(deltas[:3], fishers))]
    updates.append(received(3, deltas[3]))  # a FedCurv round's update without its Fisher
    merge = merge_round(TASK, base_weights(), updates, ROUND, BASE_CID, with_curvature=True)
    assert "missing tensor(s): fisher/" in merge.verdicts[address(3)].reason
    norms = [agg.l2_norm(d) for d in deltas[:3]]
    median = float(np.median(norms))  # the default policy clips every delta to the round's median norm
    assert merge.curvature.round_id == ROUND
    assert merge.curvature.scales == pytest.approx({address(k): min(1.0, median / norms[k]) for k in range(3)})
    assert merge.curvature.scales[address(2)] < 1.0
    sent = [codec.decode_delta(TASK, u.data, with_fisher=True) for u in updates[:3]]
    expected = penalty.summed(
        penalty.contribution(SentStatistics(ROUND, base_weights(), s.delta, s.fisher), merge.curvature.scales[address(k)])
        for k, s in enumerate(sent))
    for name in TASK.spec:
        np.testing.assert_allclose(merge.curvature.total.fisher[name], expected.fisher[name], rtol=1e-6)
        np.testing.assert_allclose(merge.curvature.total.pull[name], expected.pull[name], rtol=1e-5, atol=1e-8)
    plain = merge_round(TASK, base_weights(), updates[:3], ROUND, BASE_CID)  # not a FedCurv round: no Fisher
    assert plain.curvature is None and all("unknown tensor(s): fisher/" in v.reason for v in plain.verdicts.values())
