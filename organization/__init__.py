"""The organization's Flask app: dashboard pages and a JSON API over OrganizationService."""
from __future__ import annotations

from typing import Any

from flask import Flask

from infra import webapp
from organization.runner import RoundRunner
from organization.service import OrganizationConfig, OrganizationService


def blueprints():
    from organization import api, views

    return views.bp, api.bp


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The organization's app; `config` as for infra.webapp.create_app, with ORG_CONFIG."""
    return webapp.create_app(
        __name__, config, "ORG_CONFIG", OrganizationConfig(), cookie_name=lambda _: "fl-organization",
        extensions=extensions, blueprints=blueprints)


def extensions(settings, org_config: OrganizationConfig, w3, store, registry) -> dict[str, Any]:
    """The organization's service, and its round runner when it runs the rounds by itself."""
    service = OrganizationService(settings, org_config, w3, store, registry=registry)
    if org_config.rounds:
        service.runner = RoundRunner(service).start()
    return {"organization": service}
