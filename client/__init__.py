"""A device's Flask app: its page and JSON API over ClientService."""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from flask import Flask

from client.service import ClientConfig, ClientService
from infra import chain
from infra.settings import Settings
from infra.webapp import JobRunner, install_json_errors, install_request_guards, open_store


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """App factory. `config` may carry SETTINGS, CLIENT_CONFIG, and for tests or the embedded demo
    ready-made W3, STORE and REGISTRY objects shared with other roles in the same process."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024,
                      SECRET_KEY=os.environ.get("FL_SECRET_KEY") or secrets.token_hex(32))
    app.config.update(config or {})
    settings: Settings = app.config.setdefault("SETTINGS", Settings.from_env())
    client_config: ClientConfig = app.config.setdefault("CLIENT_CONFIG", ClientConfig())
    # Every app on 127.0.0.1 shares the browser's cookies (ports do not separate them): one name each.
    app.config.setdefault("SESSION_COOKIE_NAME", f"fl-client-{client_config.client_id}")
    w3 = app.config.get("W3") or chain.connect(settings.chain_url)
    store = app.config.get("STORE") or open_store(settings)
    app.extensions["client"] = ClientService(settings, client_config, w3, store,
                                             registry=app.config.get("REGISTRY"))
    app.extensions["jobs"] = JobRunner()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from client import api, views

    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp)
    install_request_guards(app)
    install_json_errors(app)
    return app
