"""Many devices in one process, for simulation and load tests (`run.py clients --count N`).

Each device is a ClientService and its ClientAgent, as in `run.py client`: its own key, its own
partition of the data, its own calls to the chain and IPFS, its own activity log. They share what a
process holds once: the chain connection, the IPFS client, the registry binding, TensorFlow and the
task's model (training takes turns on it), and one AgentWatcher, so one subscription to the chain.
"""
from __future__ import annotations

from dataclasses import replace

from client.agent import AgentWatcher, ClientAgent
from client.service import ClientConfig, ClientService
from infra import chain
from infra.settings import Settings
from infra.webapp import JobRunner, find_registry, open_store

# Agents looking at once: one trains while the others pull, encode or wait for IPFS and the chain.
PARALLEL_AGENTS = 4


class ClientGroup:
    """Clients `config.client_id` .. `config.client_id + count - 1`, each configured as `config`
    with its own id (its partition of the data, its key and its batch order)."""

    def __init__(self, settings: Settings, config: ClientConfig, count: int, w3=None, store=None) -> None:
        if count < 1:
            raise ValueError(f"a group has at least one device, not {count}")
        w3 = w3 or chain.connect(settings.chain_url)
        store = store or open_store(settings)
        registry = find_registry(w3, settings)  # None before the organization deploys: each looks later
        self.services = [ClientService(settings, replace(config, client_id=k), w3, store, registry=registry)
                         for k in range(config.client_id, config.client_id + count)]
        self.services[0].check_network()  # one task for the whole group: one device checks it
        self.agents = [ClientAgent(service, JobRunner()) for service in self.services]
        for service, agent in zip(self.services, self.agents):
            service.agent = agent
        self.watcher = AgentWatcher(self.agents, parallel=PARALLEL_AGENTS)

    def unfunded(self) -> list[str]:
        """The group's accounts that hold too little to submit (run.py enrol --clients-of funds them)."""
        w3 = self.services[0].w3
        return [s.address for s in self.services if w3.eth.get_balance(s.address) < chain.CLIENT_MIN_WEI]

    def start(self) -> "ClientGroup":
        self.watcher.start()
        return self

    def stop(self) -> None:
        self.watcher.stop()
