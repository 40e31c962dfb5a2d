"""The organization's round runner and the clients' agents, one decision at a time, on the embedded
chain and store: each `step` and `check_round` is what their threads do on every new block."""
from __future__ import annotations

import dataclasses

import pytest

from client import service as client_service
from client.agent import ClientAgent
from client.service import ClientConfig
from demo import embedded_system
from infra import chain
from organization.runner import RoundRunner
from organization.service import OrganizationConfig
from processor.training import TrainingSettings

TASK = "digits"
RULES = chain.RoundRules(duration=30, quorum=2)


@pytest.fixture()
def network(tmp_path):
    """An organization that runs two rounds of 30 s with a quorum of 2, and three client agents;
    the threads are not started, the test takes their steps, and time is the embedded chain's."""
    config = OrganizationConfig(task=TASK, training=TrainingSettings(epochs=2, learning_rate=0.1), rules=RULES)
    system = embedded_system(tmp_path, config, [ClientConfig(client_id=k, num_clients=3, task=TASK) for k in range(3)])
    org = system.org.extensions["organization"]
    org.config = dataclasses.replace(org.config, rounds=2)
    org.clock = lambda: system.w3.eth.get_block("pending")["timestamp"]
    agents = [ClientAgent(app.extensions["client"], app.extensions["jobs"]) for app in system.clients]
    return {"system": system, "org": org, "runner": RoundRunner(org), "agents": agents}


def time_travel(w3, seconds: int) -> None:
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("pending")["timestamp"] + seconds)


def events(agent: ClientAgent) -> list[tuple[int, str]]:
    from infra.files import read_json_lines

    return [(e["round"], e["event"]) for e in read_json_lines(agent.activity_path)]


def test_rounds_run_by_themselves_through_a_missed_quorum_a_late_client_and_restarts(network, monkeypatch):
    org, runner, agents, w3 = network["org"], network["runner"], network["agents"], network["system"].w3
    assert not runner.step() and org.registry is not None, "the runner deploys the registry itself"
    registry = org.registry
    assert registry.current_round() == 0 and "waiting for clients to enrol" in runner.state
    for agent in agents[:2]:
        org.add_client(agent.service.address)
    assert not runner.step()  # as many enrolled as the quorum: round 1 opens, under the configured rules
    assert registry.current_round() == 1 and registry.round_rules() == RULES

    agents[0].check_round()
    assert events(agents[0]) == [(1, "noticed"), (1, "submitted")]
    agents[0].check_round()  # the same round again: nothing more is sent
    assert registry.round(1).submissions == 1 and len(events(agents[0])) == 2
    assert not runner.step() and registry.current_round() == 1, "1 of 2 invited clients: the round waits"
    time_travel(w3, 32)  # round 1 ends without its quorum: restarted from the same base
    assert not runner.step()
    info = registry.round(1)
    assert info.finalized and info.model_cid == info.base_cid and registry.current_round() == 2
    assert org.accuracy_history()[1]["missed_quorum"]

    org.add_client(agents[2].service.address)  # enrolled during round 2: it takes part from round 3
    agents[2].check_round()
    assert events(agents[2]) == [(2, "not_invited")]
    agents[0].check_round()
    # Client 1's device restarts (a new agent, nothing remembered): it reads the chain and takes part once.
    restarted = ClientAgent(agents[1].service, agents[1].jobs)
    restarted.check_round()
    restarted.check_round()
    assert registry.round(2).submissions == 2 and events(restarted)[-2:] == [(2, "noticed"), (2, "submitted")]
    assert not runner.step()  # every invited client is in: merged at once, before the deadline
    assert registry.round(2).finalized and registry.current_round() == 3
    assert org.round_view(3)["expected"] == 3

    for agent in (agents[0], agents[2]):
        agent.check_round()
    fresh = ClientAgent(agents[0].service, agents[0].jobs)  # a restart after submitting: nothing sent twice
    fresh.check_round()
    assert events(fresh)[-1] == (3, "already_submitted") and registry.round(3).submissions == 2
    # Client 1 is too slow this time: its deadline passes while it trains, and the contract refuses its update.
    trained_in_time = client_service.rounds.local_update

    def slow_local_update(*args, **kwargs):
        result = trained_in_time(*args, **kwargs)
        time_travel(w3, 32)
        return result

    monkeypatch.setattr(client_service.rounds, "local_update", slow_local_update)
    agents[1].check_round()
    assert events(agents[1])[-2:] == [(3, "noticed"), (3, "refused")]
    assert agents[1].last_event["error"] == "DeadlinePassed"
    agents[1].check_round()  # the contract's refusal is final for that round: no retry
    assert events(agents[1])[-1] == (3, "refused")
    assert not runner.step()  # past the deadline with its quorum: merged from the two that came
    assert registry.round(3).finalized and registry.round(3).submissions == 2
    assert runner.step(), "two rounds merged: the run is over"
    history = org.accuracy_history()
    assert [p["round"] for p in history] == [0, 1, 2, 3]
    assert [p["missed_quorum"] for p in history[1:]] == [True, False, False]
    assert history[2]["federated"]["devices"] == 2  # round 2's model, evaluated in round 3 by both merged clients


def test_the_runner_reads_the_round_once_its_last_awaited_update_is_notified(network, monkeypatch):
    """Pushed submissions that leave the round short of its invited clients need no chain read;
    the one that completes it does, and is merged at once."""
    org, runner, agents, w3 = network["org"], network["runner"], network["agents"], network["system"].w3
    runner.step()
    for agent in agents:
        org.add_client(agent.service.address)
    runner.step()  # round 1 opens, inviting all three
    reads = []
    monkeypatch.setattr(chain.Registry, "_call", lambda self, *args, _call=chain.Registry._call:
                        reads.append(args[0]) or _call(self, *args))

    def latest_log(event: str) -> dict:  # the log a subscription pushed for the latest such event
        return w3.eth.get_logs({"address": org.registry.address, "fromBlock": org.registry.deployment_block,
                                "topics": [chain.event_topics(event)[0]]})[-1]

    enrolment_log = latest_log("ClientAdded")
    agents[0].check_round()
    runner.step()  # the look that learns 2 of the 3 invited updates are still to come
    reads.clear()
    agents[1].check_round()
    reads.clear()
    assert not runner.step([latest_log("UpdateSubmitted")]) and reads == [] and "1 more" in runner.state
    assert not runner.step([enrolment_log]) and reads, "another event: the round is read"
    agents[2].check_round()
    assert not runner.step([latest_log("UpdateSubmitted")])
    assert org.registry.round(1).finalized and org.registry.round(1).submissions == 3


def test_pushed_updates_are_fetched_once_ahead_of_the_merge(network, monkeypatch):
    """The updates a subscription pushes are fetched while the round goes on; the merge uses those
    bytes instead of fetching again, and a CID that no submission names is dropped."""
    org, runner, agents, w3 = network["org"], network["runner"], network["agents"], network["system"].w3
    runner.step()
    for agent in agents[:2]:
        org.add_client(agent.service.address)
    runner.step()
    fetched = []
    get = org.store.get
    monkeypatch.setattr(org.store, "get", lambda cid, **kwargs: fetched.append(cid) or get(cid, **kwargs))
    agents[0].check_round()
    [pushed] = w3.eth.get_logs({"address": org.registry.address, "fromBlock": org.registry.round(1).start_block,
                                "topics": [chain.event_topics("UpdateSubmitted")[0]]})
    round_id, submission = org.registry.pushed_submission(pushed)
    cid = submission.cid
    assert round_id == 1 and cid not in fetched
    runner.step([pushed])
    org._prefetched[cid].result(timeout=10)
    assert fetched.count(cid) == 1
    org.prefetch_update("bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")  # named by no submission
    agents[1].check_round()
    runner.step()  # both invited clients are in: merged
    info = org.registry.round(1)
    assert info.finalized and all(sub["verdict"]["accepted"] for sub in org.round_view(1)["submissions"])
    assert fetched.count(cid) == 1 and org._prefetched == {}


def test_an_agent_takes_part_from_the_round_started_event_alone(network, monkeypatch):
    """A pushed RoundStarted log tells an agent all it needs: it takes part without reading the
    round from the chain, and a client the round does not invite stays out."""
    org, runner, agents, w3 = network["org"], network["runner"], network["agents"], network["system"].w3
    runner.step()
    for agent in agents[:2]:
        org.add_client(agent.service.address)
    runner.step()
    [pushed] = w3.eth.get_logs({"address": org.registry.address, "fromBlock": org.registry.round(1).start_block,
                                "topics": [chain.event_topics("RoundStarted")[0]]})
    reads = []
    monkeypatch.setattr(chain.Registry, "_call", lambda self, *args, _call=chain.Registry._call:
                        reads.append(args[0]) or _call(self, *args))
    agents[0].look([pushed])
    assert events(agents[0]) == [(1, "noticed"), (1, "submitted")] and "currentRoundFor" not in reads
    agents[2].look([pushed])  # not enrolled in time for round 1
    assert events(agents[2]) == [(1, "not_invited")]
    assert org.registry.round(1).submissions == 1
