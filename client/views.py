"""Server-rendered page of a client; every button is a form post that redirects back, and the page's
live part refreshes itself (infra/static/live.js)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, flash, jsonify, redirect, render_template, url_for

from client.guide import client_guide, training_fraction, training_text
from client.service import ACTIONS, ClientService
from infra.webapp import JobRunner, describe_error

bp = Blueprint("page", __name__)
BUSY_INTERVAL_MS, IDLE_INTERVAL_MS = 1000, 3000  # how often an open page asks for its live part


def service() -> ClientService:
    return current_app.extensions["client"]


def jobs() -> JobRunner:
    return current_app.extensions["jobs"]


def page_context() -> dict[str, Any]:
    """What the page's templates render: the status, the job, the guide and the training progress."""
    current = jobs().current  # read before the status, so a finished job's effects are in the status
    job = current.as_dict() if current else None
    status = service().status()
    busy = job is not None and job["state"] == "running"
    return {"status": status, "job": job, "guide": client_guide(status, job), "working": training_text(job),
            "training": training_fraction(job), "interval": BUSY_INTERVAL_MS if busy else IDLE_INTERVAL_MS}


@bp.get("/")
def index():
    return render_template("client.html", **page_context())


@bp.get("/live")
def live():
    """The page's live part, rendered from the page's own template (static/live.js swaps it in)."""
    context = page_context()
    return jsonify(scene=context["status"]["scene"], interval=context["interval"],
                   regions={"overview": render_template("device.html", **context)})


def start(name: str, action):
    """Start the action as a job; its progress and outcome show on the page (a failure only while
    the round it was about is still the page's)."""
    try:
        svc = service()  # bound now: the job's thread runs outside this request's app context
        jobs().start(name, lambda job: action(svc, job), scene=svc.scene())
    except Exception as exc:  # shown on the page; the page itself stays up
        flash(describe_error(exc), "error")
    return redirect(url_for("page.index"))


for name, action in ACTIONS.items():
    bp.add_url_rule(f"/{name}", name, lambda name=name, action=action: start(name, action), methods=["POST"])
