"""Where the organization's network stands and what to do next, in words, from its status.

A pure function of the status the dashboard and /api/status show: a short checklist (each step
done, the one to do now, or still to come) and one sentence for the next step. When the
organization runs the rounds by itself, the next step says what it is doing, not what to press.
"""
from __future__ import annotations

from typing import Any

from infra.checklist import DONE, LATER, NOW, step


def organization_guide(status: dict[str, Any]) -> dict[str, Any]:
    """{"steps": [{"label", "state", "detail"}...], "next": sentence, "scene": what the page shows
    changes with (a message about another scene no longer applies)}."""
    steps, next_step = _steps(status)
    current = status.get("current_round") or {}
    scene = ":".join(str(part) for part in (
        status["chain"]["ok"], status["ipfs"]["ok"], (status.get("contract") or {}).get("address"),
        len(status.get("clients") or []), current.get("round"), current.get("closed"), current.get("finalized"),
        current.get("missed"), current.get("submission_count"), len(status.get("history") or [])))
    return {"steps": steps, "next": next_step, "scene": scene}


def _steps(status: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    runner = status.get("runner")
    steps: list[dict[str, str]] = []
    services_up = status["chain"]["ok"] and status["ipfs"]["ok"]
    down = [service["error"] for service in (status["chain"], status["ipfs"]) if not service["ok"]]
    steps.append(step("The chain and IPFS answer", DONE if services_up else NOW, " ".join(down)))
    if not status["chain"]["ok"]:
        return steps, "Start the chain (above); this page carries on by itself once it answers."

    contract = status.get("contract")
    if not contract:
        steps.append(step("Deploy the round registry", NOW))
        return steps, ("The organization deploys the round registry by itself." if runner else
                       "Deploy the round registry: the button below (or `python run.py deploy`, or "
                       "`truffle migrate`).")
    steps.append(step("Deploy the round registry", DONE, contract["address"]))

    quorum = contract["rules"]["quorum"]
    clients = status.get("clients")
    enrolled_enough = clients is None or len(clients) >= quorum
    if clients is None:
        detail = "open enrolment: any account may submit"
    else:
        detail = f"{len(clients)} enrolled; a round needs {quorum} update{'s' if quorum != 1 else ''} (its quorum)"
    current = status.get("current_round")
    steps.append(step("Enrol the clients", DONE if enrolled_enough or current else NOW, detail))
    if not current and not enrolled_enough:
        return steps, ("Enrol each client's address (shown on its page) with the form below or "
                       f"`python run.py enrol ADDRESS`: {len(clients)} of {quorum} enrolled"
                       + ("; the organization opens round 1 once enough are." if runner else "."))
    if not status["ipfs"]["ok"]:
        return steps, "Start IPFS (above): the models travel through it."
    if not current:
        steps.append(step("Open the first round", NOW))
        return steps, ("The organization opens round 1 by itself." if runner else
                       "Start the first round: the button below publishes the initial model and opens round 1.")
    steps.append(step("Open the first round", DONE))

    merged = [point for point in status.get("history") or [] if point["round"] > 0 and point.get("merged")]
    round_id = current["round"]
    if runner and runner.get("finished"):
        steps.append(step("Merge the rounds", DONE, f"{len(merged)} merged"))
        return steps, f"Done: {runner['state']}."
    submitted, expected = current["submission_count"], current.get("expected")
    invited = f"{submitted} of {expected} invited clients" if expected is not None else f"{submitted} clients"
    deadline = f"; deadline {current['deadline_text']}" if current.get("deadline_text") else ""
    steps.append(step(f"Round {round_id}: collect the updates", DONE if current["closed"] else NOW,
                       f"{invited} have submitted (quorum {current['quorum']}){deadline}"))
    planned = f" of {runner['rounds']}" if runner else ""
    steps.append(step("Merge the rounds", LATER, f"{len(merged)}{planned} merged so far"))
    if current.get("missed"):
        return steps, (f"Round {round_id} missed its quorum by its deadline: the organization restarts it from "
                       "its base." if runner else
                       f"Round {round_id} missed its quorum by its deadline: restart it from its base (button below).")
    everyone_in = expected is not None and submitted >= max(expected, 1)
    if current["closed"] or everyone_in:
        return steps, (f"The organization is merging round {round_id}." if runner else
                       f"Aggregate and publish round {round_id} (button below): every invited client is in.")
    wait = f"Wait for the clients: {invited} have submitted{deadline}"
    if runner:
        return steps, wait + ". The organization merges the round when every invited client is in, or at its deadline."
    if submitted >= current["quorum"]:
        return steps, wait + f"; or aggregate now with the {submitted} that arrived (button below)."
    return steps, wait + "."
