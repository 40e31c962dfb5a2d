"""A device's Flask app: its page and JSON API over ClientService."""
from __future__ import annotations

import functools
from typing import Any

from flask import Flask

from client.agent import AgentWatcher, ClientAgent
from client.service import ClientConfig, ClientService, DeviceData, read_device
from infra import webapp
from processor.spec_task import is_fetched


def blueprints():
    from client import api, views

    return views.bp, api.bp


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """A device's app; `config` as for infra.webapp.create_app, with CLIENT_CONFIG. Its data file
    is read and checked before the chain or IPFS is asked anything (unless its task is a spec
    named by a CID, which is fetched first)."""
    client_config = (config or {}).get("CLIENT_CONFIG", ClientConfig())
    device = None if is_fetched(client_config.task) else read_device(client_config)
    return webapp.create_app(
        __name__, config, "CLIENT_CONFIG", ClientConfig(),
        cookie_name=lambda client_config: f"fl-client-{client_config.client_id}",
        extensions=functools.partial(extensions, device=device), blueprints=blueprints)


def extensions(settings, client_config: ClientConfig, w3, store, registry,
               device: DeviceData | None = None) -> dict[str, Any]:
    """The device's service and job runner, and its agent when it takes part by itself."""
    service = ClientService(settings, client_config, w3, store, registry=registry, device=device)
    service.check_network()  # a device started for another task than the network's stops here
    jobs = webapp.JobRunner()
    if client_config.agent:
        service.agent = ClientAgent(service, jobs)
        AgentWatcher([service.agent]).start()
    return {"client": service, "jobs": jobs}
