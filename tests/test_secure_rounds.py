"""Secure aggregation on the real chain (Ganache) and IPFS daemon: the organization's runner and
four client agents, one decision at a time, through the stages of a secure round."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from benchmarks.secagg_attacks import HostileClient, unmask_attempts
from client import secure_round as client_round
from client.agent import AgentWatcher, ClientAgent
from client.service import ClientConfig
from demo import embedded_system
from infra import chain
from infra.secure_round import SecureRoundView, context
from organization.runner import RoundRunner
from organization.service import OrganizationConfig
from processor import codec, secagg, secure_sum
from processor.privacy import PrivacyPlan
from processor.training import TrainingSettings
from processor.weights import flatten

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
    assert all("turn to train" in state for state in stage(agents))  # shares posted
    assert not runner.step() and f"0 of {len(agents)} invited clients have submitted" in runner.state, runner.state
    stage(submitting)


def unmask_and_merge(runner: RoundRunner, survivors: list[ClientAgent], round_id: int) -> None:
    """The closed round's unmask roster, the survivors' unmasks, and its merge."""
    registry = runner.service.registry
    assert not runner.step() and "unmask messages" in runner.state, runner.state
    assert all("unmasked its update" in state for state in stage(survivors)), [a.state for a in survivors]
    assert not runner.step() and registry.round(round_id).finalized, runner.state


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
        assert submission.num_samples == 1  # the real count is masked inside, beside the delta
        values = np.concatenate([masked[n].ravel() for n in org.task.spec]).astype(np.float64)
        plain = np.concatenate([t.ravel() for t in agent.service.trained.result.delta.values()])
        assert abs(np.corrcoef(values, plain)[0, 1]) < 0.05
        assert abs(values.mean() / 2**32 - 0.5) < 0.02 and abs(values.std() / 2**32 - 12 ** -0.5) < 0.02
        with pytest.raises(codec.CodecError):  # and no float delta is in it
            codec.decode_delta(org.task, store.get(submission.cid))
    expected = plain_mean(agents)
    unmask_and_merge(runner, agents, 1)
    error = merged_error(org, 1, expected)
    assert error <= quantization_error(), error
    assert org.history()["rounds"]["1"]["accepted"] == CLIENTS
    # only the total sample count is read, from the sum: on chain and in every header each reports 1
    assert org.history()["rounds"]["1"]["merged_samples"] == sum(a.service.trained.result.num_samples for a in agents)
    assert codec.read_header(store.get(registry.round(1).model_cid))[1]["merged_samples"] == str(
        org.history()["rounds"]["1"]["merged_samples"])

    # Round 2: every client's encryption key is known from round 1, so each posts its keys and its
    # shares at once, and the organization posts the mask roster without a key roster.
    assert all("turn to train" in state for state in stage(agents)), [a.state for a in agents]
    assert not runner.step() and f"0 of {CLIENTS} invited clients have submitted" in runner.state, runner.state
    stage(agents)
    expected = plain_mean(agents)
    unmask_and_merge(runner, agents, 2)
    kinds = [m.kind for m in registry.round_messages(registry.round(2))]
    assert chain.MessageKind.KEY_ROSTER not in kinds and kinds.count(chain.MessageKind.MASK_ROSTER) == 1
    assert chain.MessageKind.SHARES not in kinds, "each client's shares came with its keys, in one message"
    assert merged_error(org, 2, expected) <= quantization_error()


def test_the_devices_of_one_process_all_post_their_shares_before_any_of_them_trains(network):
    """Training takes turns on the process's one model: a device that trained right after posting
    its shares would hold back the next devices' shares, and the mask roster with them."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    stage(agents)  # keys
    assert not runner.step() and runner.state.endswith("waiting for the clients' secret shares"), runner.state
    shares_at_training = []
    for agent in agents:
        def train(job=None, timer=None, service=agent.service, train=agent.service.train):
            shares_at_training.append(len(SecureRoundView.of(registry, registry.round(1)).shares))
            return train(job, timer)
        agent.service.train = train
    facts = client_round.RoundFacts()  # what the devices read of the round: only new blocks at each look
    assert facts.view(registry, registry.round(1)).shares == {}
    AgentWatcher(agents)._look(None)
    assert shares_at_training == [CLIENTS] * CLIENTS
    assert facts.view(registry, registry.round(1)) == SecureRoundView.of(registry, registry.round(1))
    assert all("mask roster" in agent.state for agent in agents), [a.state for a in agents]
    # the round goes on as it would have: the mask roster, then the masked updates
    assert not runner.step() and f"0 of {CLIENTS} invited clients have submitted" in runner.state, runner.state
    stage(agents)
    assert registry.round(1).submissions == CLIENTS


def test_with_agents_in_parallel_each_device_trains_in_the_training_lane_and_posts_from_the_pool(network):
    """A process's pool posts the devices' shares and masked updates; their training, one at a time
    on the process's model, runs in a lane of its own as soon as each device's shares are out."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    stage(agents)  # keys
    assert not runner.step() and runner.state.endswith("waiting for the clients' secret shares"), runner.state
    trained_on, published_on = [], []
    for agent in agents:
        service = agent.service

        def train(job=None, timer=None, train=service.train):
            trained_on.append(threading.current_thread().name)
            return train(job, timer)

        def submit(*args, submit=service._submit, **kwargs):
            published_on.append(threading.current_thread().name)
            return submit(*args, **kwargs)

        service.train, service._submit = train, submit
    watcher = AgentWatcher(agents, parallel=3)
    try:
        watcher._look(None)  # shares, then training
        assert len(trained_on) == CLIENTS and all(name.startswith("client-training") for name in trained_on)
        assert published_on == []
        assert all("mask roster" in agent.state for agent in agents), [a.state for a in agents]
        assert not runner.step() and f"0 of {CLIENTS} invited clients have submitted" in runner.state, runner.state
        watcher._look(None)  # the masked updates, from the pool
    finally:
        watcher.stop()
    assert registry.round(1).submissions == CLIENTS and len(trained_on) == CLIENTS
    assert len(published_on) == CLIENTS and all(name.startswith("client-agent") for name in published_on)


def test_a_roster_pushed_to_a_waiting_device_moves_it_on_without_reading_the_round_again(network):
    """The organization's roster log is enough: a device waiting for it takes its next step with the
    round as it last read it, and so, once it has submitted, for the unmask roster."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    assert all("key roster" in state for state in stage(agents))
    assert not runner.step()  # the key roster

    def pushed_rosters(kind: chain.MessageKind) -> list:
        logs = registry.w3.eth.get_logs({"address": registry.address, "fromBlock": registry.deployment_block,
                                          "topics": chain.event_topics("RoundMessage")})
        blocks = {m.block_number for m in registry.round_messages(registry.round(1)) if m.kind == kind}
        return [log for log in logs if log["blockNumber"] in blocks and registry.sent_by_client(log) is False]

    def no_round_read(*args):
        raise AssertionError("the device read the round again")

    for agent in agents:
        agent.service.registry.current_round_for = no_round_read
    key_roster = pushed_rosters(chain.MessageKind.KEY_ROSTER)
    assert len(key_roster) == 1
    for agent in agents:
        agent.look(key_roster)
    assert all("turn to train" in agent.state for agent in agents), [a.state for a in agents]
    for agent in agents:  # trains, then finds no mask roster to publish to
        while agent.resumable:
            agent.resume()
    assert all("mask roster" in agent.state for agent in agents), [a.state for a in agents]
    assert not runner.step() and f"0 of {CLIENTS} invited clients have submitted" in runner.state, runner.state
    for agent in agents:
        agent.look(pushed_rosters(chain.MessageKind.MASK_ROSTER))
    assert registry.round(1).submissions == CLIENTS
    assert not runner.step() and registry.round(1).closed  # all in: closed, the unmask roster posted
    for agent in agents:
        agent.look(pushed_rosters(chain.MessageKind.UNMASK_ROSTER))
    assert all(agent.service.secure_party.unmasked for agent in agents)


def test_a_client_that_drops_out_after_masking_is_recovered_from_the_survivors_pairwise_keys(network):
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    survivors, dropped = agents[:3], agents[3]
    run_to_masked_updates(runner, agents, survivors)
    assert registry.round(1).submissions == 3 and not dropped.service.secure_party.submitted
    assert not runner.step() and not registry.round(1).finalized  # waits for the deadline or the last client
    org.clock = lambda: time.time() + PAST_DEADLINE  # its deadline has passed: the round is closed with 3 of 4
    assert not runner.step()
    assert registry.round(1).closed and "unmask messages of 3 survivors" in runner.state, runner.state
    # each survivor posts its seed and its pairwise key with the dropped client: no share is needed
    assert all("keys with the 1 dropped clients" in state for state in stage(survivors)), [a.state for a in survivors]
    dropped.check_round()  # the dropped client reveals nothing: it submitted nothing
    assert not runner.step() and registry.round(1).finalized, runner.state
    assert merged_error(org, 1, plain_mean(survivors)) <= quantization_error()
    verdicts = org.history()["rounds"]["1"]["verdicts"]
    assert sorted(verdicts) == sorted(a.service.address for a in survivors)
    assert all(v["accepted"] for v in verdicts.values())
    kinds = [m.kind for m in registry.round_messages(registry.round(1))]
    assert chain.MessageKind.RECOVERY_ROSTER not in kinds and chain.MessageKind.REVEAL not in kinds


def test_a_survivor_that_goes_silent_after_submitting_is_unmasked_from_the_shares_of_its_seed(network):
    """A survivor that posts no unmask: after the stage, the organization asks for the shares of its
    self-mask seed (never of its mask secret), and three of the four holders rebuild it."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    run_to_masked_updates(runner, agents, agents)
    assert not runner.step() and "unmask messages of 4 survivors" in runner.state, runner.state
    silent, talking = agents[3], agents[:3]
    stage(talking)
    org.clock = lambda: time.time() + 3  # the unmask stage (2 s) is over
    assert not runner.step() and "shares of 1 clients' secrets" in runner.state, runner.state
    view = SecureRoundView.of(registry, registry.round(1))
    assert view.recovery_roster == [silent.service.address]
    assert all("revealed shares for the 1 clients" in state for state in stage(talking)), [a.state for a in talking]
    assert not runner.step() and registry.round(1).finalized, runner.state
    assert merged_error(org, 1, plain_mean(agents)) <= quantization_error()
    assert org.history()["rounds"]["1"]["accepted"] == CLIENTS


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
    assert all("turn to train" in state for state in stage(agents)), [a.state for a in agents]


def test_a_newcomer_brings_back_the_key_roster_so_that_every_client_holds_shares(tmp_path, ganache_url, ipfs_api):
    """Round 2 invites a client that posted no encryption key in round 1: everyone then waits for
    the key roster and shares with all four."""
    network = make_network(tmp_path, ganache_url, ipfs_api, enrolled=3)
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    org.add_client(agents[3].service.address)  # during round 1: it takes part from round 2
    run_to_masked_updates(runner, agents[:3], agents[:3])
    unmask_and_merge(runner, agents[:3], 1)
    survivors, dropped = [agents[0], agents[3], agents[2]], agents[1]
    run_to_masked_updates(runner, agents, survivors)
    kinds = [m.kind for m in registry.round_messages(registry.round(2))]
    assert kinds.count(chain.MessageKind.KEY_ROSTER) == 1
    org.clock = lambda: time.time() + PAST_DEADLINE
    unmask_and_merge(runner, survivors, 2)
    assert merged_error(org, 2, plain_mean(survivors)) <= quantization_error()
    assert dropped.service.secure_party.round_id == 2 and not dropped.service.secure_party.submitted


def test_a_late_clients_published_update_stays_masked_for_an_outside_reader(network):
    """The attack that broke the promise, replayed: a client masks and adds its update to IPFS just
    as the round closes without it. The survivors' unmasks give away every pairwise key with it,
    and still what an outside reader is left with is its self mask, unrelated to its delta."""
    org, runner, agents, store = network["org"], network["runner"], network["agents"], network["store"]
    registry = org.registry
    survivors, late = agents[:3], agents[3]
    run_to_masked_updates(runner, agents, survivors)
    late.service.train()  # too slowly: the round closes before it submits
    org.clock = lambda: time.time() + PAST_DEADLINE
    assert not runner.step() and registry.round(1).closed, runner.state
    # what the client did before it looked at the round's state: masked against the roster, added to IPFS
    service, party = late.service, late.service.secure_party
    view = SecureRoundView.of(registry, registry.round(1))
    plan = service.base.privacy
    data = client_round.masked_update(registry, service.task, party, service.address, view,
                                      service.trained.result.delta, secure_sum.quantization_bound(plan),
                                      service.trained.result.num_samples, plan.secure_groups, plan.threshold)
    late_cid = store.add(data)
    stage(survivors)
    assert not runner.step() and registry.round(1).finalized, runner.state
    truths = {a.service.address: a.service.trained.result.delta for a in agents}
    correlations = unmask_attempts(registry, store, org.task, 1, plan, {late.service.address: late_cid}, truths)
    assert sorted(correlations) == sorted(truths)  # the reader found every update, the late one too
    chance = 5 / np.sqrt(flatten(truths[late.service.address]).size)  # five standard deviations of chance
    assert all(abs(correlation) < chance for correlation in correlations.values()), correlations
    # what protects it is the seed no one revealed: with it, the same reading gives its delta
    masked = flatten(codec.decode_masked_delta(org.task, data, 1, registry.round(1).base_cid, late.service.address))
    assert masked.size == flatten(truths[late.service.address]).size + 1  # its sample count last
    mask_context = context(registry.address, 1, "masks")
    peers = {c: view.keys[c].mask for c in view.mask_roster}
    exposed = masked - secagg.self_mask(party.seed, masked.size, mask_context) - secagg.pairwise_mask(
        late.service.address, party.mask.secret, peers, masked.size, mask_context)
    quantizer = secagg.Quantizer(bound=secure_sum.quantization_bound(plan), max_clients=CLIENTS)
    truth = flatten(truths[late.service.address])
    assert np.max(np.abs(quantizer.dequantize_sum(exposed[:-1], 1) - truth)) <= quantizer.step
    assert exposed[-1] == service.trained.result.num_samples


def test_a_client_never_publishes_once_the_round_has_closed(network, monkeypatch):
    """The client was past its last look at the round (it trained meanwhile) when the round closed:
    it looks again before it masks, and nothing reaches IPFS or the chain."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    late = agents[3]
    run_to_masked_updates(runner, agents, agents[:3])
    opened = registry.current_round_for(late.service.address)  # as it read the round before it trained
    assert opened.open and not opened.submitted
    org.clock = lambda: time.time() + PAST_DEADLINE
    assert not runner.step() and registry.round(1).closed, runner.state
    added = []
    monkeypatch.setattr(late.service.store, "add", lambda data, *a, **k: added.append(data))
    result = late.service.participate(None, opened)
    assert "closed before this client could submit" in result["left_out"] and added == []
    assert not late.service.secure_party.submitted and registry.round(1).submissions == 3


def test_one_hostile_client_voids_no_round_and_is_left_off_the_next(network):
    """A client whose masked update has the wrong shapes counts as dropped: the survivors give
    their pairwise keys with it, the round merges the three others, and the next rounds' rosters
    leave it out. Then a client that posts shares of another secret and goes silent: recovered
    from the survivors' keys, no share needed."""
    org, runner, agents = network["org"], network["runner"], network["agents"]
    registry = org.registry
    hostile = HostileClient(agents[3].service.address, org.config.privacy)
    with hostile.installed():
        hostile.kind = "wrong_length"
        run_to_masked_updates(runner, agents, agents)
        assert registry.round(1).submissions == CLIENTS
        unmask_and_merge(runner, agents[:3], 1)
        entry = org.history()["rounds"]["1"]
        assert entry["accepted"] == 3 and "unusable" in entry["verdicts"][hostile.address]["reason"]
        assert merged_error(org, 1, plain_mean(agents[:3])) <= quantization_error()
        assert org.barred_clients(2) == {hostile.address}
        stage(agents)  # round 2: all four post keys and shares at once
        assert not runner.step()
        view = SecureRoundView.of(registry, registry.round(2))
        assert view.mask_roster == sorted((a.service.address for a in agents[:3]), key=str.lower)
    # round 2 merges the three; in round 3 the hostile client is still barred (5 rounds)
    stage(agents[:3])
    unmask_and_merge(runner, agents[:3], 2)
    assert org.history()["rounds"]["2"]["accepted"] == 3
