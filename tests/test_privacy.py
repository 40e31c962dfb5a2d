"""Client-level differential privacy: the plan, the mechanism, the accountant, the batched clients,
and DP rounds on the real Ganache chain and IPFS daemon."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats

from processor import aggregate as agg
from processor import batched_mlp, privacy, rounds
from processor.privacy import PrivacyPlan
from processor.tasks import get_task
from processor.training import TrainingSettings

DP_PLAN = PrivacyPlan(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5, epsilon_budget=30.0)


# ---- the accountant -------------------------------------------------------------------------


def rdp_epsilon(noise_multiplier: float, rounds_: int, delta: float, orders) -> float:
    """Epsilon of `rounds_` Gaussian mechanisms, computed here: each has Renyi divergence
    alpha / (2 z^2) at order alpha, composition adds them, and (alpha, r) converts to
    r + log(1 - 1/alpha) - log(delta * alpha) / (alpha - 1) (Canonne, Kamath & Steinke 2020, Prop. 12),
    at the best order."""
    return min(rounds_ * a / (2 * noise_multiplier ** 2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
               for a in orders)


def classical_rdp_epsilon(noise_multiplier: float, rounds_: int, delta: float, orders) -> float:
    """Mironov 2017's conversion r + log(1/delta) / (alpha - 1): looser."""
    return min(rounds_ * a / (2 * noise_multiplier ** 2) + math.log(1 / delta) / (a - 1) for a in orders)


def exact_gaussian_epsilon(noise_multiplier: float, rounds_: int, delta: float) -> float:
    """The exact epsilon of the composition, itself a Gaussian mechanism of mu = sqrt(rounds) / z
    (Balle & Wang 2018; Dong, Roth & Su 2019): the tightest there is."""
    mu = math.sqrt(rounds_) / noise_multiplier

    def delta_at(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


# the orders dp-accounting's RdpAccountant evaluates by default, written out here
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def test_epsilon_of_a_known_schedule_matches_one_computed_independently():
    spent = privacy.epsilon_spent(20, DP_PLAN)
    assert spent == pytest.approx(rdp_epsilon(1.1, 20, 1e-5, ORDERS), rel=1e-9)
    assert spent == pytest.approx(26.5006, abs=1e-3)
    # between the exact Gaussian mechanism's epsilon and the classical conversion's
    assert exact_gaussian_epsilon(1.1, 20, 1e-5) < spent < classical_rdp_epsilon(1.1, 20, 1e-5, ORDERS)
    assert privacy.epsilon_spent(0, DP_PLAN) == 0.0
    assert privacy.epsilon_spent(1, PrivacyPlan(clip_norm=1.0)) == math.inf  # clipped, no noise: no DP


@pytest.mark.parametrize("epsilon, rounds_", [(1.0, 10), (8.0, 10), (4.0, 50)])
def test_calibration_inverts_the_accountant(epsilon, rounds_):
    z = privacy.noise_multiplier_for(epsilon, rounds_, 1e-5)
    plan = PrivacyPlan(clip_norm=1.0, noise_multiplier=z)
    assert privacy.epsilon_spent(rounds_, plan) <= epsilon
    assert privacy.epsilon_spent(rounds_, dataclasses.replace(plan, noise_multiplier=0.999 * z)) > epsilon


def test_rounds_within_the_budget():
    within = privacy.rounds_within_budget(DP_PLAN)
    assert privacy.epsilon_spent(within, DP_PLAN) <= 30.0 < privacy.epsilon_spent(within + 1, DP_PLAN)
    assert privacy.rounds_within_budget(dataclasses.replace(DP_PLAN, epsilon_budget=0.0)) is None
    assert privacy.rounds_within_budget(dataclasses.replace(DP_PLAN, epsilon_budget=0.1)) == 0


# ---- the mechanism --------------------------------------------------------------------------


def test_the_noise_is_gaussian_with_the_plans_std():
    values = privacy.gaussian(200_001, 0.8)
    assert values.dtype == np.float32 and values.shape == (200_001,)
    # the std's estimate is off by more than 1 % with probability ~1e-9 (6 standard errors)
    assert np.std(values) == pytest.approx(0.8, rel=0.01)
    assert abs(np.mean(values)) < 6 * 0.8 / math.sqrt(len(values))
    # Kolmogorov-Smirnov distance: beyond 2.5 / sqrt(n) with probability ~7e-6
    assert stats.kstest(values / 0.8, "norm").statistic < 2.5 / math.sqrt(len(values))
    assert not np.array_equal(privacy.gaussian(1000, 1.0), privacy.gaussian(1000, 1.0))  # no fixed seed


def test_each_client_adds_the_whole_noise_alone_and_a_share_of_it_under_secure_aggregation():
    assert privacy.client_noise_std(DP_PLAN) == pytest.approx(1.1)
    secure = dataclasses.replace(DP_PLAN, secure_aggregation=True, threshold=4)
    assert privacy.client_noise_std(secure) == pytest.approx(1.1 / 2)  # 4 shares sum to the plan's variance
    assert privacy.client_noise_std(PrivacyPlan()) == 0.0


def test_privatize_clips_then_adds_the_noise():
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(0, 1, (300, 100)).astype(np.float32), "b": rng.normal(0, 1, 500).astype(np.float32)}
    clipped = privacy.clip(delta, 2.0)
    assert agg.l2_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    assert privacy.clip(clipped, 5.0) is clipped and privacy.clip(delta, 0.0) is delta
    quiet = privacy.privatize(delta, PrivacyPlan(clip_norm=2.0))
    assert agg.l2_norm(quiet) == pytest.approx(2.0, rel=1e-6)
    plan = PrivacyPlan(clip_norm=2.0, noise_multiplier=0.5)
    noised = privacy.privatize(delta, plan)
    noise = np.concatenate([(noised[n] - clipped[n]).ravel() for n in delta])
    assert all(noised[n].dtype == np.float32 and noised[n].shape == delta[n].shape for n in delta)
    assert np.std(noise) == pytest.approx(1.0, rel=0.02)  # z * C, 30,500 values
    assert agg.l2_norm(noised) <= privacy.max_update_norm(plan, noise.size)
    # the bound is tight enough to refuse an unclipped delta under the same noise
    assert agg.l2_norm(delta) > privacy.max_update_norm(PrivacyPlan(clip_norm=2.0), noise.size)
    unclipped_noised = {n: delta[n] + (noised[n] - clipped[n]) for n in delta}
    assert agg.l2_norm(unclipped_noised) > privacy.max_update_norm(plan, noise.size)


# ---- the plan as JSON ------------------------------------------------------------------------


def test_the_plan_round_trips_through_json():
    secure = PrivacyPlan(clip_norm=0.5, noise_multiplier=2.0, delta=1e-6, epsilon_budget=8.0, secure_aggregation=True,
                         threshold=3)
    for plan in (PrivacyPlan(), DP_PLAN, secure):
        assert len(plan.to_json()) < privacy.MAX_JSON
        assert PrivacyPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("text, says", [
    ("", "JSON object"), ("[]", "JSON object"), ("null", "JSON object"), ("{" * 600, "JSON object"),
    ('"' + "x" * 600 + '"', "JSON object"), ("\x00\xff", "JSON object"),
    ('{"clip_norm": 1.0}', "fields"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "extra": 1}), "fields"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "clip_norm": "1.0"}), "clip_norm"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "clip_norm": True}), "clip_norm"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "threshold": 2.5}), "threshold"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "secure_aggregation": 1}), "secure_aggregation"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "clip_norm": -1}), "clip_norm"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "noise_multiplier": 1e400}), "noise_multiplier"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "clip_norm": 0.0}), "clip norm"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "delta": 1.0}), "delta"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "secure_aggregation": True}), "threshold"),
    (json.dumps({**json.loads(DP_PLAN.to_json()), "threshold": 3}), "threshold"),
    ('{"clip_norm": NaN, "noise_multiplier": 0, "delta": 1e-5, "epsilon_budget": 0, "secure_aggregation": false, '
     '"threshold": 0}', "clip_norm"),
])
def test_a_bad_plan_is_refused_saying_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        PrivacyPlan.from_json(text)


def test_the_plans_flags_are_apart_from_the_merges_clip_norm():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--clip-norm", type=float)  # run.py app's: the organization's bound on the merge
    PrivacyPlan.add_flags(parser)
    args = parser.parse_args(["--clip-norm", "5", "--dp-clip-norm", "1", "--noise-multiplier", "0.5"])
    assert args.clip_norm == 5.0
    assert PrivacyPlan.from_args(args) == PrivacyPlan(clip_norm=1.0, noise_multiplier=0.5)
    assert PrivacyPlan.from_args(parser.parse_args(["--clip-norm", "5"])) == PrivacyPlan()
    preset = argparse.ArgumentParser()
    PrivacyPlan.add_flags(preset, preset="the preset's")
    assert PrivacyPlan.from_args(preset.parse_args(["--noise-multiplier", "2"]), base=DP_PLAN) == \
        dataclasses.replace(DP_PLAN, noise_multiplier=2.0)


# ---- the batched clients ---------------------------------------------------------------------


def test_batched_clients_train_as_local_update_does():
    task = get_task("mnist")
    weights = rounds.initial_model(task, seed=0)
    zeros = {n: np.zeros_like(w) for n, w in weights.items()}
    training = TrainingSettings(epochs=2, batch_size=8, learning_rate=0.1)
    shards = [task.client_data(k, 200, seed=0) for k in range(3)]
    shards[2] = (shards[2][0][:5], shards[2][1][:5])  # fewer samples than a batch, and than the others
    seeds = [11, 12, 13]
    stacked = batched_mlp.local_deltas(task, weights, shards, training, seeds)
    for k, (x, y) in enumerate(shards):
        reference = rounds.local_update(task, weights, zeros, x, y, training, seed=seeds[k]).delta
        for name in task.spec:
            np.testing.assert_allclose(stacked[name][k], reference[name], atol=1e-5)
        assert agg.l2_norm(reference) > 0.01


# ---- the organization's check of DP updates ---------------------------------------------------


def test_a_dp_round_merges_the_plain_mean_and_refuses_an_update_longer_than_its_noise_allows():
    from processor import codec
    from processor.screen import MergePolicy, Received, merge_round

    task = get_task("digits")
    base = rounds.initial_model(task, seed=0)
    plan = PrivacyPlan(clip_norm=0.5, noise_multiplier=0.4)
    rng = np.random.default_rng(1)
    raw = [{n: rng.normal(0, 0.3, s).astype(np.float32) for n, s in task.spec.items()} for _ in range(4)]
    deltas = [privacy.privatize(d, plan) for d in raw[:3]]
    deltas.append({n: raw[3][n] + (deltas[0][n] - privacy.clip(raw[0], 0.5)[n]) for n in task.spec})  # not clipped
    addresses = [f"0x{k + 1:040x}" for k in range(4)]
    updates = [Received(a, 10 * (k + 1), codec.encode_delta(task, d, 1, "bafy-base", 10 * (k + 1), a))
               for k, (a, d) in enumerate(zip(addresses, deltas))]
    merge = merge_round(task, base, updates, 1, "bafy-base", MergePolicy(), plan)
    assert [merge.verdicts[a].accepted for a in addresses] == [True, True, True, False]
    assert "exceeds the bound" in merge.verdicts[addresses[3]].reason
    assert [merge.verdicts[a].weight for a in addresses[:3]] == [1, 1, 1]  # not the sample counts
    for name in task.spec:  # no median clipping or cosine weighting of noise: the plain mean
        mean = np.mean([d[name] for d in deltas[:3]], axis=0)
        np.testing.assert_allclose(merge.weights[name], base[name] + mean, atol=1e-6)


# ---- DP rounds on Ganache and the IPFS daemon ------------------------------------------------


@pytest.mark.ganache
@pytest.mark.ipfs_daemon
def test_dp_rounds_on_the_full_stack_publish_noised_deltas_account_epsilon_and_stop_at_the_budget(
        tmp_path, ganache_url, ipfs_api):
    import organization
    import client
    from client.agent import ClientAgent
    from client.service import ClientConfig
    from infra import chain, ipfs
    from infra.files import read_json_lines
    from infra.settings import Settings
    from organization.runner import RoundRunner
    from organization.service import OrganizationConfig
    from processor import codec

    task = get_task("digits")
    two_rounds = privacy.epsilon_spent(2, PrivacyPlan(clip_norm=0.5, noise_multiplier=0.8))
    plan = PrivacyPlan(clip_norm=0.5, noise_multiplier=0.8, epsilon_budget=two_rounds + 0.01)
    settings = Settings.from_env(state_dir=tmp_path, chain_url=ganache_url, ipfs_api=ipfs_api,
                                 contract_record=tmp_path / "deployments.json")
    shared = {"SETTINGS": settings, "W3": chain.connect(ganache_url), "STORE": ipfs.open_store(ipfs_api, tmp_path)}
    config = OrganizationConfig(task=task.name, training=TrainingSettings(epochs=2, learning_rate=0.1),
                                rules=chain.RoundRules(duration=0, quorum=2), privacy=plan)
    org_app = organization.create_app({**shared, "ORG_CONFIG": config})
    client_apps = [client.create_app({**shared, "CLIENT_CONFIG": ClientConfig(client_id=k, num_clients=2,
                                                                              task=task.name)})
                   for k in range(2)]
    org = org_app.extensions["organization"]
    org.config = dataclasses.replace(org.config, rounds=5)  # the runner's steps are the test's: no thread
    runner = RoundRunner(org)
    agents = [ClientAgent(app.extensions["client"], app.extensions["jobs"]) for app in client_apps]
    assert not runner.step() and org.registry is not None
    for agent in agents:
        org.add_client(agent.service.address)
    assert not runner.step() and org.registry.current_round() == 1

    dimension = sum(math.prod(shape) for shape in task.spec.values())
    noise_norm = 0.8 * 0.5 * math.sqrt(dimension)  # each public delta carries the whole noise (local DP)
    for round_id in (1, 2):
        for agent in agents:
            agent.check_round()
        info = org.registry.round(round_id)
        for submission in org.registry.logged_submissions(info):
            delta, _, _ = codec.decode_delta(task, org.store.get(submission.cid))
            norm = agg.l2_norm(delta)
            # what the clipped delta (norm <= 0.5) adds to the noise's norm is at most its own 0.5
            assert noise_norm * 0.95 - 0.5 < norm < noise_norm * 1.05 + 0.5
            assert norm <= privacy.max_update_norm(plan, dimension)
        assert not runner.step() and org.registry.round(round_id).finalized
        entry = org.history()["rounds"][str(round_id)]
        assert entry["epsilon"] == pytest.approx(privacy.epsilon_spent(round_id, plan))
        assert entry["accepted"] == 2 and all(v["weight"] == 1 for v in entry["verdicts"].values())

    assert org.registry.current_round() == 3  # finalizing round 2 opened it, but it would exceed the budget
    assert runner.step() and "privacy budget is spent" in runner.state
    for agent in agents:
        agent.check_round()
        last = read_json_lines(agent.activity_path)[-1]
        assert (last["round"], last["event"]) == (3, "refused") and "privacy budget is spent" in last["reason"]
    assert org.registry.round(3).submissions == 0
    org.runner = runner
    page = org_app.test_client().get("/").get_data(as_text=True)
    assert "Epsilon spent (delta 1e-05)" in page and f"{entry['epsilon']:.2f}" in page
    assert "privacy budget is spent" in page
    device_page = client_apps[0].test_client().get("/").get_data(as_text=True)
    assert f"clipped to L2 norm 0.5, plus Gaussian noise of std {0.4:.3g} per coordinate" in device_page


def test_a_private_round_refuses_fedcurv_whose_clients_would_publish_their_fisher_in_the_clear():
    dp = PrivacyPlan(clip_norm=1.0, noise_multiplier=0.5)
    secure = PrivacyPlan(clip_norm=1.0, secure_aggregation=True, threshold=2)
    for plan in (dp, secure):
        with pytest.raises(ValueError, match="FedCurv cannot run in a private round"):
            plan.refuse_regularizer("fedcurv")
        plan.refuse_regularizer("fedprox")
    PrivacyPlan().refuse_regularizer("fedcurv")
