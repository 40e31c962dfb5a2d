"""Where a device stands in the network and what comes next, in words, from its status.

A pure function of the status its page and /api/status show: a short checklist and one sentence
for the next step. A device that takes part by itself says what it is doing; one that waits to be
asked says which button to press.
"""
from __future__ import annotations

from typing import Any

from infra.checklist import DONE, LATER, NOW, step


def training_text(job: dict[str, Any] | None) -> str | None:
    """What a running job is doing, e.g. "training: epoch 1 of 2, batch 40 of 94"; None when idle."""
    if not job or job["state"] != "running":
        return None
    step = job.get("step") or job["name"]
    progress = job.get("progress") or {}
    if step != "train":
        return {"pull": "pulling the base model", "publish": "publishing the update"}.get(step, step)
    if "batches" not in progress:
        return "training"
    if progress["batch"] == 0:  # an epoch's end
        return f"training: epoch {progress['epoch']} of {progress['epochs']} done"
    return (f"training: epoch {progress['epoch'] + 1} of {progress['epochs']}, "
            f"batch {progress['batch']} of {progress['batches']}")


def training_fraction(job: dict[str, Any] | None) -> float | None:
    """The share of a running training job's batches done (0-1); None when it does not train."""
    progress = (job or {}).get("progress") or {}
    if not job or job["state"] != "running" or "batches" not in progress:
        return None
    return (progress["epoch"] * progress["batches"] + progress["batch"]) / (progress["epochs"] * progress["batches"])


def client_guide(status: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
    """{"steps": [...], "next": sentence} for the device's page."""
    steps: list[dict[str, str]] = []
    chain_ok, ipfs_ok = status["chain_error"] is None, status["ipfs"]["ok"]
    down = [text for text in (status["chain_error"], None if ipfs_ok else status["ipfs"]["error"]) if text]
    steps.append(step("The chain and IPFS answer", DONE if chain_ok and ipfs_ok else NOW, " ".join(down)))
    if not chain_ok:
        return {"steps": steps, "next": "Start the chain (above); this page carries on by itself once it answers."}
    if not status["contract"]:
        steps.append(step("The organization deploys its round registry", NOW))
        return {"steps": steps, "next": "Wait for the organization to deploy its round registry."}
    steps.append(step("The organization deploys its round registry", DONE, status["contract"]))
    if not status.get("enrolled"):
        steps.append(step("The organization enrols this device", NOW, status["address"]))
        return {"steps": steps, "next": (f"Ask the organization to enrol this device's address {status['address']} "
                                         "(on its dashboard, or `python run.py enrol ADDRESS`).")}
    steps.append(step("The organization enrols this device", DONE))
    current = status.get("round")
    if current is None:
        steps.append(step("A round opens", NOW))
        return {"steps": steps, "next": "Wait for the organization to open the first round."}
    round_id = current["round"]
    steps.append(step(f"Round {round_id} opens", DONE, "invites this device" if current["invited"] else
                       "does not invite this device"))
    base, trained = status.get("base") or {}, status.get("trained") or {}
    for label, done in (("pull the base model", base.get("round") == round_id and base.get("cid") == current["base_cid"]),
                        ("train on the local data", trained.get("round") == round_id),
                        ("publish the update", current["submitted"])):
        steps.append(step(f"Round {round_id}: {label}", DONE if done or current["submitted"] else LATER))
    working = training_text(job)
    if working:
        next_step = f"Round {round_id}: {working}."
    elif current["submitted"]:
        next_step = f"Done with round {round_id}: the organization merges it and opens round {round_id + 1}."
    elif not current["invited"]:
        next_step = f"Round {round_id} does not invite this device: wait for the next one."
    elif not current["open"]:
        next_step = f"Round {round_id} is closed to submissions: wait for the next one."
    elif not ipfs_ok:
        next_step = "Start IPFS (above): the base model and the update travel through it."
    elif status.get("agent"):
        next_step = f"Nothing to press: this device takes part by itself ({status['agent']['state']})."
    else:
        deadline = f" before its deadline, {current['deadline_text']}" if current.get("deadline_text") else ""
        next_step = f"Press Participate to take part in round {round_id}{deadline} (or Pull, Train and Publish)."
    pending = [item for item in steps if item["state"] == LATER]
    if pending and current["invited"] and current["open"]:  # the first of the round's steps still to do
        pending[0]["state"] = NOW
    return {"steps": steps, "next": next_step}
