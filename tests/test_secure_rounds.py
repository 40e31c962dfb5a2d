"""Secure aggregation on the real chain (Ganache) and IPFS daemon: the organization's runner and
four client agents, one decision at a time, through the stages of a secure round."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from client.agent import ClientAgent
from client.service import ClientConfig
from demo import embedded_system
from infra import chain
from organization.runner import RoundRunner
from organization.service import OrganizationConfig
from processor import codec, secagg
from processor.privacy import PrivacyPlan
from processor.training import TrainingSettings

TASK = "digits"
CLIENTS = 4
THRESHOLD = 3
CLIP = 2.0
# A round's deadline: long enough for four clients' keys, shares and training on a loaded machine
# (with 12 s, the first test failed once in a full run and never alone).
DURATION = 30
PAST_DEADLINE = DURATION + 3  # seconds ahead on the organization's clock: the deadline has passed


def make_network(tmp_path, ganache_url, ipfs_api, enrolled: int = CLIENTS) -> dict:
    """An organization running secure rounds (threshold 3, DURATION s, quorum 3) and four client agents,
    the first `enrolled` of them enrolled before round 1 opens; no thread runs: the test takes
    their steps."""
    plan = PrivacyPlan(clip_norm=CLIP, secure_aggregation=True, threshold=THRESHOLD)
    config = OrganizationConfig(task=TASK, training=TrainingSettings(epochs=2, learning_rate=0.1), privacy=plan,
                                rules=chain.RoundRules(duration=DURATION, quorum=THRESHOLD), stage_seconds=2.0)
    system = embedded_system(tmp_path, config, [ClientConfig(client_id=k, num_clients=CLIENTS, task=TASK)
                                                for k in range(CLIENTS)], chain_url=ganache_url, ipfs_api=ipfs_api)
    org = system.org.extensions["organization"]
    org.config = dataclasses.replace(org.config, rounds=3)  # after the app is made: no runner thread of its own
    runner = RoundRunner(org)
    agents = [ClientAgent(app.extensions["client"], app.extensions["jobs"]) for app in system.clients]
    assert not runner.step()  # deploys the registry
    for agent in agents[:enrolled]:
        org.add_client(agent.service.address)
    assert not runner.step() and org.registry.current_round() == 1
    return {"org": org, "runner": runner, "agents": agents, "store": system.store}


@pytest.fixture()
def network(tmp_path, ganache_url, ipfs_api):
    return make_network(tmp_path, ganache_url, ipfs_api)


def stage(agents: list[ClientAgent]) -> list[str]:
    for agent in agents:
        agent.check_round()
    return [agent.state for agent in agents]


def run_to_masked_updates(runner: RoundRunner, agents: list[ClientAgent], submitting: list[ClientAgent]) -> None:
    """Keys, key roster, shares, mask roster; then `submitting` submit their masked updates."""
    assert all("key roster" in state for state in stage(agents))  # keys posted
    assert not runner.step() and runner.state.endswith("waiting for the clients' secret shares"), runner.state
    assert all("mask roster" in state for state in stage(agents))  # shares posted
    assert not runner.step() and f"0 of {len(agents)} invited clients have submitted" in runner.state, runner.state
    stage(submitting)


def plain_mean(agents: list[ClientAgent]) -> dict:
    deltas = [agent.service.trained.result.delta for agent in agents]
    return {n: np.mean([d[n] for d in deltas], axis=0) for n in deltas[0]}


def merged_error(org, round_id: int, expected: dict) -> float:
    """The largest difference between the round's merged delta and `expected`, less what float32
    weights cannot tell apart (the model is published as float32: new - base is exact only to one
    spacing of the larger weight)."""
    registry = org.registry
    new = codec.decode_model(org.task, org.store.get(registry.round(round_id).model_cid)).weights
    base = codec.decode_model(org.task, org.store.get(registry.round(round_id).base_cid)).weights
    return max(float(np.max(np.abs(new[n] - base[n] - expected[n]) - np.spacing(np.maximum(abs(new[n]), abs(base[n])))))
               for n in new)


def quantization_error() -> float:
    """The largest error of a mean of stochastically rounded values: one step per coordinate."""
    return secagg.Quantizer(bound=CLIP, max_clients=CLIENTS).step


def test_a_secure_round_publishes_only_masked_updates_and_merges_their_exact_mean(network):
    org, runner, agents, store = network["org"], network["runner"], network["agents"], network["store"]
    registry = org.registry
    run_to_masked_updates(runner, agents, agents)
    assert registry.round(1).submissions == CLIENTS
    for submission, agent in zip(sorted(registry.submissions(1), key=lambda s: s.client),
                                 sorted(agents, key=lambda a: a.service.address)):
        # what anyone reads from IPFS: field elements spread over Z_2^32, unrelated to the client's delta
        masked = codec.decode_masked_delta(org.task, store.get(submission.cid), 1, registry.round(1).base_cid,
                                           submission.client)
        values = np.concatenate([t.ravel() for t in masked.values()]).astype(np.float64)
        plain = np.concatenate([t.ravel() for t in agent.service.trained.result.delta.values()])
        assert abs(np.corrcoef(values, plain)[0, 1]) < 0.05
        assert abs(values.mean() / 2**32 - 0.5) < 0.02 and abs(values.std() / 2**32 - 12 ** -0.5) < 0.02
        with pytest.raises(codec.CodecError):  # and no float delta is in it
            codec.decode_delta(org.task, store.get(submission.cid))
    expected = plain_mean(agents)
    assert not runner.step() and registry.round(1).finalized, runner.state
    error = merged_error(org, 1, expected)
    assert error <= quantization_error(), error
    assert org.history()["rounds"]["1"]["accepted"] == CLIENTS

    # Round 2: every client's encryption key is known from round 1, so each posts its keys and its
    # shares at once, and the organization posts the mask roster without a key roster.
    assert all("mask roster" in state for state in stage(agents)), [a.state for a in agents]
    assert not runner.step() and f"0 of {CLIENTS} invited clients have submitted" in runner.state, runner.state
    stage(agents)
    expected = plain_mean(agents)
    assert not runner.step() and registry.round(2).finalized, runner.state
    kinds = [m.kind for m in registry.round_messages(registry.round(2))]
    assert chain.MessageKind.KEY_ROSTER not in kinds and kinds.count(chain.MessageKind.MASK_ROSTER) == 1
    assert chain.MessageKind.SHARES not in kinds, "each client's shares came with its keys, in one message"
    assert merged_error(org, 2, expected) <= quantization_error()


def test_a_client_that_drops_out_after_masking_is_recovered_from_the_others_shares(network):
    org, runner, agents, store = network["org"], network["runner"], network["agents"], network["store"]
    registry = org.registry
    survivors, dropped = agents[:3], agents[3]
    run_to_masked_updates(runner, agents, survivors)
    assert registry.round(1).submissions == 3 and not dropped.service.secure_party.submitted
    assert not runner.step() and not registry.round(1).finalized  # waits for the deadline or the last client
    org.clock = lambda: time.time() + PAST_DEADLINE  # its deadline has passed: the round is closed with 3 of 4
    assert not runner.step()
    assert registry.round(1).closed and "secrets of 1 dropped clients" in runner.state, runner.state
    stage(survivors)  # each survivor reveals its share of the dropped client's mask secret
    assert all("revealed shares for the 1 clients" in agent.state for agent in survivors)
    dropped.check_round()  # the dropped client reveals nothing: it submitted nothing
    assert not runner.step() and registry.round(1).finalized, runner.state
    assert merged_error(org, 1, plain_mean(survivors)) <= quantization_error()
    verdicts = org.history()["rounds"]["1"]["verdicts"]
    assert sorted(verdicts) == sorted(a.service.address for a in survivors)
    assert all(v["accepted"] for v in verdicts.values())


def test_a_round_with_more_dropouts_than_it_tolerates_is_reopened_not_stuck(network):
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    run_to_masked_updates(runner, agents, agents[:2])  # 2 of 4 submit: fewer than the threshold of 3
    assert registry.round(1).submissions == 2
    org.clock = lambda: time.time() + PAST_DEADLINE
    time.sleep(max(0.0, registry.round(1).deadline + 1.5 - time.time()))  # the chain's own clock must pass it
    assert not runner.step()
    info = registry.round(1)
    assert info.finalized and info.model_cid == info.base_cid and registry.current_round() == 2
    assert org.history()["rounds"]["1"]["missed_quorum"]
    org.clock = time.time
    # round 2 starts its stages anew (keys and shares at once: round 1 published every encryption key)
    assert all(state.endswith("mask roster") for state in stage(agents)), [a.state for a in agents]


def test_a_newcomer_brings_back_the_key_roster_so_that_every_client_holds_shares(tmp_path, ganache_url, ipfs_api):
    """Round 2 invites a client that posted no encryption key in round 1: everyone then waits for
    the key roster and shares with all four, so a dropout is recovered with the newcomer's help."""
    network = make_network(tmp_path, ganache_url, ipfs_api, enrolled=3)
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    org.add_client(agents[3].service.address)  # during round 1: it takes part from round 2
    run_to_masked_updates(runner, agents[:3], agents[:3])
    assert not runner.step() and registry.round(1).finalized, runner.state
    survivors, dropped = [agents[0], agents[3], agents[2]], agents[1]
    run_to_masked_updates(runner, agents, survivors)
    kinds = [m.kind for m in registry.round_messages(registry.round(2))]
    assert kinds.count(chain.MessageKind.KEY_ROSTER) == 1
    org.clock = lambda: time.time() + PAST_DEADLINE
    assert not runner.step() and "secrets of 1 dropped clients" in runner.state, runner.state
    stage([agents[3]])  # the newcomer's share alone would not do: the threshold is 3 of the survivors
    stage(survivors[:1])
    assert not runner.step() and not registry.round(2).finalized
    stage(survivors[2:])
    assert not runner.step() and registry.round(2).finalized, runner.state
    assert merged_error(org, 2, plain_mean(survivors)) <= quantization_error()
    assert dropped.service.secure_party.round_id == 2 and not dropped.service.secure_party.submitted
