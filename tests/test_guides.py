"""The dashboards' checklists and next steps, from statuses of every stage (pure functions)."""
from __future__ import annotations

from client.guide import client_guide, training_fraction, training_text
from organization.guide import organization_guide

UP = {"ok": True}
CHAIN_DOWN = {"ok": False, "error": "The chain at http://127.0.0.1:8545 does not answer. Start it with "
                                    "`python run.py chain`, or point FL_CHAIN_URL at one that runs."}
CONTRACT = {"address": "0xC0", "open_enrolment": False, "rules": {"quorum": 2, "duration": 20, "invited_share": 10000}}


def org_status(**changes) -> dict:
    status = {"chain": UP, "ipfs": UP, "contract": CONTRACT, "clients": [], "current_round": None, "history": [],
              "runner": None}
    return {**status, **changes}


def open_round(**changes) -> dict:
    return {"round": 3, "closed": False, "finalized": False, "missed": False, "submission_count": 1, "expected": 3,
            "quorum": 2, "deadline_text": "12:00:00 UTC (14 s left)", **changes}


def states(guide: dict) -> list[str]:
    return [step["state"] for step in guide["steps"]]


def test_the_organization_is_told_each_next_step_by_hand():
    assert organization_guide(org_status(chain=CHAIN_DOWN))["next"].startswith("Start the chain")
    assert organization_guide(org_status(contract=None))["next"].startswith("Deploy the round registry: the button")
    guide = organization_guide(org_status(clients=[{"address": "0xA"}]))
    assert guide["next"].startswith("Enrol each client's address") and "1 of 2 enrolled." in guide["next"]
    assert states(guide) == ["done", "done", "now"]
    two = [{"address": "0xA"}, {"address": "0xB"}]
    assert organization_guide(org_status(clients=two))["next"].startswith("Start the first round")
    assert organization_guide(org_status(clients=two, ipfs={"ok": False, "error": "down"}))["next"].startswith(
        "Start IPFS")
    waiting = organization_guide(org_status(clients=two, current_round=open_round()))
    assert waiting["next"] == ("Wait for the clients: 1 of 3 invited clients have submitted; deadline 12:00:00 UTC "
                               "(14 s left).")
    enough = organization_guide(org_status(clients=two, current_round=open_round(submission_count=2)))
    assert enough["next"].endswith("or aggregate now with the 2 that arrived (button below).")
    assert organization_guide(org_status(clients=two, current_round=open_round(submission_count=3)))["next"] == (
        "Aggregate and publish round 3 (button below): every invited client is in.")
    assert organization_guide(org_status(clients=two, current_round=open_round(missed=True)))["next"].startswith(
        "Round 3 missed its quorum by its deadline: restart it")


def test_an_organization_that_runs_the_rounds_says_what_it_does():
    runner = {"rounds": 10, "finished": False, "state": "round 3: 1 of 3"}
    two = [{"address": "0xA"}, {"address": "0xB"}]
    assert organization_guide(org_status(contract=None, runner=runner))["next"] == (
        "The organization deploys the round registry by itself.")
    assert organization_guide(org_status(clients=two, runner=runner))["next"] == (
        "The organization opens round 1 by itself.")
    guide = organization_guide(org_status(clients=two, runner=runner, current_round=open_round(),
                                          history=[{"round": 0}, {"round": 1, "merged": True},
                                                   {"round": 2, "missed_quorum": True, "merged": False}]))
    assert guide["next"].endswith("The organization merges the round when every invited client is in, or at its "
                                  "deadline.")
    assert guide["steps"][-1]["detail"] == "1 of 10 merged so far"
    finished = {**runner, "finished": True, "state": "finished: 10 rounds merged, test accuracy 0.9000"}
    assert organization_guide(org_status(clients=two, runner=finished, current_round=open_round()))["next"] == (
        "Done: finished: 10 rounds merged, test accuracy 0.9000.")


def test_open_enrolment_needs_no_enrolment():
    guide = organization_guide(org_status(clients=None))
    assert guide["steps"][2]["detail"] == "open enrolment: any account may submit"
    assert guide["next"].startswith("Start the first round")


def client_status(**changes) -> dict:
    status = {"chain_error": None, "ipfs": UP, "contract": "0xC0", "enrolled": True, "address": "0xA",
              "round": {"round": 2, "base_cid": "bafy", "open": True, "submitted": False, "invited": True,
                        "deadline_text": None}, "base": None, "trained": None, "agent": None}
    return {**status, **changes}


def test_a_device_is_told_each_next_step():
    assert client_guide(client_status(chain_error=CHAIN_DOWN["error"]), None)["next"].startswith("Start the chain")
    assert client_guide(client_status(contract=None), None)["next"].startswith("Wait for the organization to deploy")
    assert client_guide(client_status(enrolled=False), None)["next"] == (
        "Ask the organization to enrol this device's address 0xA (on its dashboard, or `python run.py enrol ADDRESS`).")
    assert client_guide(client_status(round=None), None)["next"] == "Wait for the organization to open the first round."
    guide = client_guide(client_status(), None)
    assert guide["next"].startswith("Press Participate to take part in round 2")
    assert states(guide)[-3:] == ["now", "later", "later"]  # pull comes first
    submitted = client_status(round={**client_status()["round"], "submitted": True})
    assert client_guide(submitted, None)["next"].startswith("Done with round 2")
    assert states(client_guide(submitted, None))[-3:] == ["done", "done", "done"]
    agent = client_status(agent={"state": "taking part in round 2"})
    assert client_guide(agent, None)["next"] == "Nothing to press: this device takes part by itself (taking part in round 2)."


def test_training_progress_in_words_and_as_a_share():
    running = {"name": "participate", "state": "running", "step": "train",
               "progress": {"epoch": 1, "epochs": 4, "batch": 10, "batches": 20}}
    assert training_text(running) == "training: epoch 2 of 4, batch 10 of 20"
    assert training_fraction(running) == (1 * 20 + 10) / 80
    epoch_end = {**running, "progress": {"epoch": 2, "epochs": 4, "batch": 0, "batches": 20, "loss": 0.3}}
    assert training_text(epoch_end) == "training: epoch 2 of 4 done" and training_fraction(epoch_end) == 0.5
    assert training_text({**running, "step": "pull"}) == "pulling the base model"
    assert training_fraction({**running, "step": "pull", "progress": {}}) is None
    assert training_text({**running, "state": "done"}) is None
    assert client_guide(client_status(), running)["next"] == "Round 2: training: epoch 2 of 4, batch 10 of 20."
