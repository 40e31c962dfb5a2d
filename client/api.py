"""JSON API of a client (documented in README.md).

Long actions (train, participate) run as a background job unless the body says {"wait": true};
GET /api/job shows the job's step and training progress.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from client.guide import client_guide
from client.service import ACTIONS, ClientService
from infra.webapp import ActionError, JobRunner, json_body

bp = Blueprint("api", __name__, url_prefix="/api")


def service() -> ClientService:
    return current_app.extensions["client"]


def jobs() -> JobRunner:
    return current_app.extensions["jobs"]


def run_job(name: str, action):
    body = json_body()
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise ActionError("field 'wait' must be true or false", 400)
    svc = service()  # bound now: the job's thread runs outside this request's app context
    job = jobs().start(name, lambda job: action(svc, job), wait=wait)
    return jsonify(job.as_dict()), (200 if wait else 202)


@bp.get("/status")
def status():
    current = jobs().current
    job = current.as_dict() if current else None
    status = service().status()
    return jsonify({**status, "job": job, "guide": client_guide(status, job)})


@bp.get("/job")
def job():
    current = jobs().current
    if current is None:
        raise ActionError("no job has run yet", 404)
    return jsonify(current.as_dict())


for name, action in ACTIONS.items():
    bp.add_url_rule(f"/{name}", name, lambda name=name, action=action: run_job(name, action), methods=["POST"])
