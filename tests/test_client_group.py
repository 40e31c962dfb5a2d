"""Many devices in one process (run.py clients): on the embedded chain and store, the group's one
watcher takes the looks its thread would take, and the organization's runner its steps."""
from __future__ import annotations

import dataclasses

import numpy as np

from client.group import ClientGroup, GroupConfig
from client.service import ClientConfig
from demo import embedded_system
from infra import chain
from infra.files import read_json_lines
from organization.runner import RoundRunner
from organization.service import OrganizationConfig
from processor.training import TrainingSettings

TASK = "digits"
FIRST_ID, COUNT = 17, 4  # Ganache's last two client accounts, then two derived keys


def events(agent) -> list[tuple[int, str]]:
    return [(e["round"], e["event"]) for e in read_json_lines(agent.activity_path)]


def submitters(registry: chain.Registry, round_id: int) -> list[str]:
    return [submission.client for submission in registry.submissions(round_id)]


def test_a_group_submits_once_per_device_and_round_from_its_own_accounts_across_a_restart(tmp_path, monkeypatch):
    config = OrganizationConfig(task=TASK, training=TrainingSettings(epochs=1, learning_rate=0.1),
                                rules=chain.RoundRules(quorum=COUNT - 1))
    system = embedded_system(tmp_path, config)
    org = system.org.extensions["organization"]
    org.config = dataclasses.replace(org.config, rounds=2)
    runner = RoundRunner(org)
    runner.step()  # deploys the registry
    registry = org.registry

    def group() -> ClientGroup:  # its watcher not started: the test takes its looks
        first = ClientConfig(client_id=FIRST_ID, num_clients=FIRST_ID + COUNT, task=TASK, agent=True)
        return ClientGroup(system.settings, GroupConfig(first, COUNT), system.w3, system.store, registry)

    devices = group()
    addresses = [chain.client_address(k) for k in range(FIRST_ID, FIRST_ID + COUNT)]
    assert [service.address for service in devices.services] == addresses
    assert addresses[:2] == [chain.client_address(17), chain.client_address(18)] and len(set(addresses)) == COUNT
    assert not np.array_equal(devices.services[0].x, devices.services[1].x), "each device has its own partition"
    unfunded = devices.unfunded()
    assert set(unfunded) <= set(addresses[2:]), "Ganache's accounts are funded at genesis"
    assert chain.fund_accounts(system.w3, chain.DEV_KEYS[0], addresses) == unfunded and devices.unfunded() == []

    for address in addresses[:-1]:  # the last device is never enrolled: no round invites it
        org.add_client(address)
    runner.step()
    assert registry.current_round() == 1
    devices.watcher._look(None)  # what the watcher's thread does as it starts
    *invited, outsider = devices.agents
    assert all(events(agent) == [(1, "noticed"), (1, "submitted")] for agent in invited)
    assert events(outsider) == [(1, "not_invited")]
    assert sorted(submitters(registry, 1)) == sorted(addresses[:-1])
    assert [(device["client_id"], device["address"], device["last_event"]["event"]) for device in devices.status()] \
        == list(zip(range(FIRST_ID, FIRST_ID + COUNT), addresses, ["submitted"] * 3 + ["not_invited"]))

    reads = []
    monkeypatch.setattr(chain.Registry, "_call", lambda self, *args, _call=chain.Registry._call:
                        reads.append(args[0]) or _call(self, *args))
    devices.watcher._look(None)  # a recheck with every device done with the round: one read, nothing sent
    assert reads == ["currentRound"] and registry.round(1).submissions == COUNT - 1

    restarted = group()  # the process starts again, remembering nothing: the chain says what was done
    restarted.watcher._look(None)
    assert all(events(agent)[-1] == (1, "already_submitted") for agent in restarted.agents[:-1])
    assert registry.round(1).submissions == COUNT - 1

    runner.step()  # every invited device is in: merged, and round 2 opens
    assert registry.round(1).finalized and registry.current_round() == 2
    [opened] = system.w3.eth.get_logs({"address": registry.address, "fromBlock": registry.round(2).start_block,
                                       "topics": [chain.event_topics("RoundStarted")[0]]})
    restarted.watcher._look([opened])  # pushed by the subscription
    restarted.watcher._look([opened])  # the same notification twice: nothing more is sent
    assert sorted(submitters(registry, 2)) == sorted(addresses[:-1])
    assert all(events(agent)[-2:] == [(2, "noticed"), (2, "submitted")] for agent in restarted.agents[:-1])
    assert events(restarted.agents[-1])[-1] == (2, "not_invited")
    runner.step()
    assert registry.round(2).finalized
    assert all(sub["verdict"]["accepted"] for sub in org.round_view(2)["submissions"])
