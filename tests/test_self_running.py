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
