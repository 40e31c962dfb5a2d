"""Server-rendered page of a client; every button is a form post that redirects back."""
from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, url_for

from client.service import ACTIONS, ClientService
from infra.webapp import JobRunner, describe_error

bp = Blueprint("page", __name__)


def service() -> ClientService:
    return current_app.extensions["client"]


def jobs() -> JobRunner:
    return current_app.extensions["jobs"]


@bp.get("/")
def index():
    job = jobs().current  # read before the status, so a finished job's effects are in the status
    return render_template("client.html", status=service().status(), job=job)


def start(name: str, action):
    try:
        svc = service()  # bound now: the job's thread runs outside this request's app context
        jobs().start(name, lambda job: action(svc, job))
        flash(f"{name.capitalize()} started", "ok")
    except Exception as exc:  # shown on the page; the page itself stays up
        flash(describe_error(exc), "error")
    return redirect(url_for("page.index"))


for name, action in ACTIONS.items():
    bp.add_url_rule(f"/{name}", name, lambda name=name, action=action: start(name, action), methods=["POST"])
