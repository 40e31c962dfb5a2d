"""Server-rendered dashboard of the organization; every button is a form post that redirects back."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, flash, jsonify, redirect, render_template, request, url_for

from infra.plots import accuracy_png, error_png
from infra.webapp import ActionError, describe_error
from organization.service import OrganizationService

bp = Blueprint("dashboard", __name__)


def service() -> OrganizationService:
    return current_app.extensions["organization"]


LIVE_INTERVAL_MS = 2000  # how often an open dashboard asks for its live parts


def enrol_shown(status: dict[str, Any]) -> bool:
    """Whether enrolling can work now: a contract with an allowlist, on a chain that answers."""
    return bool(status["chain"]["ok"] and status["contract"] and status["contract"].get("open_enrolment") is False)


@bp.get("/")
def index():
    status = service().status()
    return render_template("dashboard.html", status=status, interval=LIVE_INTERVAL_MS, enrol_shown=enrol_shown(status))


@bp.get("/live")
def live():
    """The dashboard's live parts, rendered from the page's own templates (static/live.js swaps
    them in); the enrolment form stays out of them so that its text is never wiped."""
    status = service().status()
    return jsonify(scene=status["guide"]["scene"], interval=LIVE_INTERVAL_MS,
                   regions={"overview": render_template("overview.html", status=status),
                            "details": render_template("details.html", status=status)},
                   visible={"enrol": enrol_shown(status)})


@bp.get("/chart.png")
def chart():
    task, baseline, history = service().task, service().baseline, service().accuracy_history()
    metric = task.headline
    shown = "RMSE" if task.numeric_label else "accuracy"
    if task.has_test_set:
        name, points = f"test {shown}", [(p["round"], p[metric]) for p in history]
    else:  # the devices' held-out evaluation of each model, reported with the next round's updates
        name, points = f"devices' held-out {shown}", [(p["round"], p["federated"][metric]) for p in history
                                                     if p["federated"]]
    title = f"{task.name}: {name} per round"
    if task.numeric_label:
        png = error_png({name: points}, title=title, metric="RMSE",
                        baseline=baseline and (f"always {baseline['answer']:.4g}", baseline["rmse"]))
    else:
        png = accuracy_png({name: points}, title=title,
                           baseline=baseline and (f"always {baseline['answer']}", baseline["accuracy"]))
    return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})


def run_action(action, done: str):
    try:
        result = action()
        flash(done.format(result=result), "ok")
    except ActionError as exc:
        flash(str(exc), "error")
    except Exception as exc:  # shown on the page; the dashboard itself stays up
        flash(describe_error(exc), "error")
    return redirect(url_for("dashboard.index"))


@bp.post("/deploy")
def deploy():
    return run_action(service().deploy, "Deployed the round registry at {result}")


@bp.post("/clients")
def add_client():
    address = request.form.get("address", "").strip()
    return run_action(lambda: service().add_client(address), "Client {result[client]} is enrolled")


@bp.post("/rounds")
def start_first_round():
    return run_action(service().start_first_round, "Round 1 started from {result[base_cid]}")


@bp.post("/rounds/<int:round_id>/aggregate")
def aggregate(round_id: int):
    return run_action(lambda: service().aggregate(round_id),
                      "Round {result[round]} finalized: model {result[model_cid]}; round {result[next_round]} is open")


@bp.post("/rounds/<int:round_id>/restart")
def restart(round_id: int):
    return run_action(lambda: service().restart(round_id),
                      "Round {result[round]} missed its quorum; round {result[next_round]} opens from the same base")
