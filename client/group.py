"""Many devices in one process, for simulation and load tests (`run.py clients --count N`).

Each device is a ClientService and its ClientAgent, as in `run.py client`: its own key, its own
partition of the data, its own calls to the chain and IPFS, its own activity log. They share what a
process holds once: the chain connection, the IPFS client, the registry binding, TensorFlow and the
task's model (training takes turns on it), what a secure round's devices read alike, and one
AgentWatcher, so one subscription to the chain.
One small app serves them all: GET /api/status lists each device's state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

from client.agent import AgentWatcher, ClientAgent
from client.secure_round import RoundFacts
from client.service import ClientConfig, ClientService, read_device, spec_fetcher
from infra import chain, webapp
from infra.settings import Settings
from infra.webapp import JobRunner
from processor.spec_task import load_task

# Agents looking at once: one trains while the others pull, encode or wait for IPFS and the chain.
PARALLEL_AGENTS = 8


@dataclass(frozen=True)
class GroupConfig:
    first: ClientConfig = field(default_factory=lambda: ClientConfig(agent=True))  # the others differ by id
    count: int = 1


def device_config(first: ClientConfig, client_id: int) -> ClientConfig:
    """Device `client_id`'s configuration: `first`'s, with its id, and its own data file where
    `first`'s names one per device (`devices/device{id}.csv`)."""
    data = first.data_path
    if data is not None and "{id}" in str(data):
        data = Path(str(data).replace("{id}", str(client_id)))
    elif data is not None:
        raise ValueError(f"a group's devices each read their own file: name them with {{id}} ({data})")
    return replace(first, client_id=client_id, data_path=data)


class ClientGroup:
    """Clients `config.first.client_id` .. + `config.count` - 1, each configured as `config.first`
    with its own id (its partition of the data, its key and its batch order), and its own data
    file where `config.first.data_path` names one per device with `{id}`. They share one task."""

    def __init__(self, settings: Settings, config: GroupConfig, w3, store, registry: chain.Registry | None) -> None:
        if config.count < 1:
            raise ValueError(f"a group has at least one device, not {config.count}")
        first = config.first.client_id
        facts = RoundFacts()  # a secure round's facts, read once for every device
        task = load_task(config.first.task, fetch=spec_fetcher(store))  # one working model for all
        configs = [device_config(config.first, k) for k in range(first, first + config.count)]
        self.services = [ClientService(settings, device, w3, store, registry=registry, round_facts=facts,
                                       device=read_device(device, task)) for device in configs]
        self.services[0].check_network()  # one task for the whole group: one device checks it
        self.agents = [ClientAgent(service, JobRunner()) for service in self.services]
        for service, agent in zip(self.services, self.agents):
            service.agent = agent
        self.watcher = AgentWatcher(self.agents, parallel=PARALLEL_AGENTS)

    def unfunded(self) -> list[str]:
        """The group's accounts that hold too little to submit (run.py enrol --clients-of funds them)."""
        w3 = self.services[0].w3
        return [s.address for s in self.services if w3.eth.get_balance(s.address) < chain.CLIENT_MIN_WEI]

    def status(self) -> list[dict[str, Any]]:
        """Each device's id, address, state and last event, without a call to the chain."""
        return [{"client_id": s.config.client_id, "address": s.address, **s.agent.status()} for s in self.services]


bp = Blueprint("group_api", __name__, url_prefix=webapp.API_PREFIX)


@bp.get("/status")
def status():
    return jsonify(devices=current_app.extensions["group"].status())


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The group's app; `config` as for infra.webapp.create_app, with GROUP_CONFIG. Its devices
    take part from the moment it is made."""
    return webapp.create_app(
        __name__, config, "GROUP_CONFIG", GroupConfig(),
        cookie_name=lambda group_config: f"fl-clients-{group_config.first.client_id}",
        extensions=extensions, blueprints=lambda: (bp,))


def extensions(settings, group_config: GroupConfig, w3, store, registry) -> dict[str, Any]:
    group = ClientGroup(settings, group_config, w3, store, registry or webapp.find_registry(w3, settings))
    group.watcher.start()
    return {"group": group}
