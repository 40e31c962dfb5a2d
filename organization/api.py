"""JSON API of the organization (documented in README.md)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from infra.webapp import json_body
from organization.service import OrganizationService

bp = Blueprint("api", __name__, url_prefix="/api")


def service() -> OrganizationService:
    return current_app.extensions["organization"]


@bp.get("/status")
def status():
    return jsonify(service().status())


@bp.post("/deploy")
def deploy():
    return jsonify(address=service().deploy()), 201


@bp.post("/clients")
def add_client():
    body = json_body(address=str)
    return jsonify(service().add_client(body["address"]))


@bp.post("/rounds")
def start_first_round():
    return jsonify(service().start_first_round()), 201


@bp.get("/rounds/<int:round_id>")
def get_round(round_id: int):
    return jsonify(service().round_view(round_id))


@bp.post("/rounds/<int:round_id>/aggregate")
def aggregate(round_id: int):
    return jsonify(service().aggregate(round_id))


@bp.post("/rounds/<int:round_id>/restart")
def restart(round_id: int):
    return jsonify(service().restart(round_id))


@bp.get("/history")
def history():
    return jsonify(service().accuracy_history())
