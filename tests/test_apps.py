"""The organization and client apps through Flask's test client, on the embedded chain and store."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import organization
from client.service import ClientConfig
from demo import embedded_system
from infra import chain
from organization.service import OrganizationConfig
from processor import codec
from processor.training import TrainingSettings

TASK = "digits"


@pytest.fixture()
def system(tmp_path):
    """An organization app and two client apps sharing one in-process chain and store."""
    plan = TrainingSettings(epochs=2, learning_rate=0.1)
    system = embedded_system(tmp_path, OrganizationConfig(task=TASK, training=plan),
                             [ClientConfig(client_id=k, num_clients=2, task=TASK) for k in range(2)])
    return {"org": system.org.test_client(), "clients": [c.test_client() for c in system.clients], "w3": system.w3,
            "store": system.store, "settings": system.settings}


def deploy_and_enrol(system) -> None:
    org = system["org"]
    assert org.post("/api/deploy").status_code == 201
    for c in system["clients"]:
        address = c.get("/api/status").get_json()["address"]
        assert org.post("/api/clients", json={"address": address}).status_code == 200


def test_status_before_deployment(system):
    status = system["org"].get("/api/status").get_json()
    assert status["contract"] is None
    assert status["chain"]["ok"] and status["ipfs"]["ok"]
    answer = system["org"].post("/api/rounds")
    assert answer.status_code == 409
    assert "deploy" in answer.get_json()["error"]


def test_bad_requests_get_4xx_with_a_message(system):
    org = system["org"]
    deploy_and_enrol(system)
    assert system["clients"][0].get("/api/job").status_code == 404  # nothing has run yet
    cases = [
        (org.post("/api/deploy"), 409),
        (org.post("/api/clients", data="{not json", content_type="application/json"), 400),
        (org.post("/api/clients", json=["a", "list"]), 400),
        (org.post("/api/clients", json={}), 400),
        (org.post("/api/clients", json={"address": 42}), 400),
        (org.post("/api/clients", json={"address": "0x1234"}), 400),
        (org.get("/api/rounds/7"), 404),
        (org.get("/api/rounds/0"), 404),
        (org.post("/api/rounds/7/aggregate"), 404),
        (org.get("/api/no-such-endpoint"), 404),
        (system["clients"][0].post("/api/participate", json={"wait": "yes"}), 400),
        (system["clients"][0].post("/api/pull", json={"wait": True}), 409),  # no round yet
        (system["clients"][0].post("/api/publish", json={"wait": True}), 409),  # nothing trained
    ]
    for answer, status in cases:
        assert answer.status_code == status, answer.get_json()
        assert answer.get_json()["error"]


def test_a_round_through_the_apis(system):
    org, clients = system["org"], system["clients"]
    deploy_and_enrol(system)
    first = org.post("/api/rounds")
    assert first.status_code == 201
    initial_accuracy = first.get_json()["metrics"]["accuracy"]
    assert org.post("/api/rounds").status_code == 409  # only one first round

    assert org.post("/api/rounds/1/aggregate").status_code == 409  # nothing submitted yet
    for c in clients:
        job = c.post("/api/participate", json={"wait": True}).get_json()
        assert job["state"] == "done", job
        assert job["result"]["round"] == 1 and job["result"]["gas"] > 0
        # two epochs on its own data: the local model fits that data better than the random base did
        assert job["result"]["metric"] == "accuracy" and job["result"]["after"] > job["result"]["before"]
    again = clients[0].post("/api/participate", json={"wait": True})
    assert again.status_code == 409 and "already submitted" in again.get_json()["error"]

    view = org.get("/api/rounds/1").get_json()
    assert view["submission_count"] == 2 and not view["finalized"]
    result = org.post("/api/rounds/1/aggregate").get_json()
    assert result["accepted"] == 2 and result["next_round"] == 2 and result["submissions"] == 2
    assert all(v["accepted"] and v["reason"] is None and v["weight"] > 0 and v["norm"] > 0
               for v in result["verdicts"].values())
    # Closed to submissions before its submissions were read, then finalized with all of them.
    registry = organization_registry(org)
    [closed] = registry.events("RoundClosed")
    [final] = registry.events("RoundFinalized")
    assert closed["args"] == {"round": 1, "submissionCount": 2} and closed["block_number"] < final["block_number"]
    assert result["metrics"]["accuracy"] > initial_accuracy

    status = org.get("/api/status").get_json()
    assert status["current_round"]["round"] == 2
    assert status["current_round"]["base_cid"] == result["model_cid"]
    assert [p["round"] for p in status["history"]] == [0, 1]
    finalized = org.get("/api/rounds/1").get_json()
    assert finalized["finalized"] and finalized["model_cid"] == result["model_cid"]
    assert org.post("/api/rounds/1/aggregate").status_code == 409  # never twice

    # The published model is on the store, named by its CID, and decodes against the task.
    from processor import codec
    from processor.tasks import get_task

    task = get_task(TASK)
    weights, _, meta, _ = codec.decode_model(task, system["store"].get(result["model_cid"]))
    assert meta["round"] == "2" and meta["kind"] == "base"  # the next round's base
    data = task.data()
    assert task.evaluate(weights, data.x_test, data.y_test)["accuracy"] == pytest.approx(result["metrics"]["accuracy"])

    page = org.get("/").get_data(as_text=True)
    assert "Round <span id=\"round\">2</span>" in page and result["model_cid"] in page
    assert org.get("/chart.png").mimetype == "image/png"
    client_page = clients[0].get("/").get_data(as_text=True)
    assert "before" in client_page and "submitUpdate" in client_page


def test_restarted_organization_carries_on(system, tmp_path):
    org, clients = system["org"], system["clients"]
    deploy_and_enrol(system)
    org.post("/api/rounds")
    for c in clients:
        c.post("/api/participate", json={"wait": True})
    registry = organization_registry(org)
    # A second organization app on the same chain, store and state folder: a restart.
    restarted = organization.create_app({
        "SETTINGS": system["settings"], "W3": system["w3"], "STORE": system["store"], "REGISTRY": registry,
        "ORG_CONFIG": OrganizationConfig(task=TASK)}).test_client()
    assert restarted.get("/api/status").get_json()["current_round"]["submission_count"] == 2
    assert restarted.post("/api/rounds/1/aggregate").status_code == 200
    assert org.get("/api/status").get_json()["current_round"]["round"] == 2
    # The first app still holds round 1 as it opened it; the chain refuses its late finalization.
    late = org.post("/api/rounds/1/aggregate")
    assert late.status_code == 409 and late.get_json()["error"] == "round 1 is already finalized"


def organization_registry(org_client) -> chain.Registry:
    return org_client.application.extensions["organization"].registry


def form_token(app_client, page: str = "/") -> str:
    """The CSRF token the page renders into its forms for this test client's session."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', app_client.get(page).get_data(as_text=True))
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def test_form_posts_redirect_with_a_message(system):
    org = system["org"]
    token = form_token(org)
    answer = org.post("/rounds", data={"csrf_token": token}, follow_redirects=True)
    assert answer.status_code == 200 and "deploy it first" in answer.get_data(as_text=True)
    answer = org.post("/deploy", data={"csrf_token": token}, follow_redirects=True)
    assert "Deployed the round registry" in answer.get_data(as_text=True)


def test_form_posts_without_the_session_token_are_refused(system):
    org, client_app = system["org"], system["clients"][0]
    for data in ({}, {"csrf_token": "forged"}):
        answer = org.post("/deploy", data=data)
        assert answer.status_code == 400 and "security token" in answer.get_data(as_text=True)
    assert org.get("/api/status").get_json()["contract"] is None  # nothing was done
    # A token belongs to the session that rendered it: another browser's token does not work here.
    stranger = system["org"].application.test_client()
    assert org.post("/deploy", data={"csrf_token": form_token(stranger)}).status_code == 400
    assert org.get("/api/status").get_json()["contract"] is None

    assert client_app.post("/participate").status_code == 400
    assert client_app.get("/api/job").status_code == 404  # no job was started
    answer = client_app.post("/participate", data={"csrf_token": form_token(client_app)}, follow_redirects=True)
    assert answer.status_code == 200 and client_app.get("/api/job").get_json()["name"] == "participate"


def test_cross_site_api_posts_and_oversized_bodies_are_refused(system):
    org = system["org"]
    answer = org.post("/api/deploy", headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403 and "cross-site" in answer.get_json()["error"]
    assert org.get("/api/status").get_json()["contract"] is None
    limit = org.application.config["MAX_CONTENT_LENGTH"]
    for path in ("/api/clients", "/api/deploy", "/deploy"):
        answer = org.post(path, data=b"x" * (limit + 1), content_type="application/json")
        assert answer.status_code == 413 and "larger than" in answer.get_json()["error"]
    assert org.get("/api/status").get_json()["contract"] is None
    assert org.post("/api/deploy", headers={"Origin": "http://localhost"}).status_code == 201  # same site


def test_every_client_trains_by_the_organizations_plan(tmp_path):
    plan = TrainingSettings(epochs=3, batch_size=16, learning_rate=0.1, update_dtype="float32")
    system = embedded_system(tmp_path, OrganizationConfig(task=TASK, training=plan),
                             [ClientConfig(client_id=k, num_clients=2, task=TASK) for k in range(2)])
    org, clients = system.org.test_client(), [c.test_client() for c in system.clients]
    assert org.post("/api/deploy").status_code == 201
    for c in clients:
        assert org.post("/api/clients", json={"address": c.get("/api/status").get_json()["address"]}).status_code == 200
    assert clients[0].get("/api/status").get_json()["plan"] is None  # nothing pulled yet
    assert org.post("/api/rounds").status_code == 201
    for c in clients:
        job = c.post("/api/participate", json={"wait": True}).get_json()
        assert job["state"] == "done" and job["progress"]["epochs"] == 3
        assert c.get("/api/status").get_json()["plan"] == dataclasses.asdict(plan)
        assert "3 epoch(s) · batch 16" in c.get("/").get_data(as_text=True)
    for submission in org.get("/api/rounds/1").get_json()["submissions"]:
        table, _ = codec.read_header(system.store.get(submission["cid"]))
        assert {entry.dtype for entry in table.values()} == {"F32"}  # the plan's dtype, not the clients' default


def test_each_app_names_its_own_session_cookie(system):
    """Browsers share cookies across the ports of one host: a page of one app must not replace the
    session (and so the form tokens) of another's."""
    names = set()
    for app in (system["org"], *system["clients"]):
        answer = app.get("/")
        [cookie] = [header for header in answer.headers.getlist("Set-Cookie")]
        names.add(cookie.split("=", 1)[0])
    assert names == {"fl-organization", "fl-client-0", "fl-client-1"}


def test_a_client_of_another_task_is_refused_at_start_up_and_at_its_pull(system, tmp_path):
    """A device started for mnist in a network that learns digits says so, naming the network's task,
    instead of failing only when it takes part."""
    import client
    from client.service import WrongNetwork

    shared = {"SETTINGS": system["settings"], "W3": system["w3"], "STORE": system["store"]}
    mnist_device = ClientConfig(client_id=2, num_clients=4, task="mnist")
    early = client.create_app({**shared, "CLIENT_CONFIG": mnist_device})  # no round yet: nothing to check
    deploy_and_enrol(system)
    assert system["org"].post("/api/rounds").status_code == 201
    with pytest.raises(WrongNetwork, match="the organization's rounds learn the task 'digits'.* started for "
                                           "'mnist': start it with --task digits"):
        client.create_app({**shared, "CLIENT_CONFIG": dataclasses.replace(mnist_device, client_id=3)})
    answer = early.test_client().post("/api/pull", json={"wait": True})
    assert answer.status_code == 409 and "start it with --task digits" in answer.get_json()["error"]


def test_a_fedcurv_round_pulls_each_client_towards_the_others_updates_of_the_last_round(tmp_path, monkeypatch):
    """The apps exchange FedCurv's statistics: each update carries its Fisher, the next base their
    sum, and each client trains against the other clients' part of it."""
    from processor import penalty, rounds
    from processor.tasks import get_task

    pulls, local_update = [], rounds.local_update

    def spy(*args, others=None, **kwargs):
        pulls.append(others)
        return local_update(*args, others=others, **kwargs)

    monkeypatch.setattr(rounds, "local_update", spy)
    plan = TrainingSettings(epochs=2, learning_rate=0.1, regularizer="fedcurv", ewc_lambda=0.3)
    embedded = embedded_system(tmp_path, OrganizationConfig(task=TASK, training=plan),
                               [ClientConfig(client_id=k, num_clients=2, task=TASK) for k in range(2)])
    system = {"org": embedded.org.test_client(), "clients": [c.test_client() for c in embedded.clients]}
    deploy_and_enrol(system)
    org, clients, task, store = system["org"], system["clients"], get_task(TASK), embedded.store
    assert org.post("/api/rounds").status_code == 201
    for c in clients:
        assert c.post("/api/participate", json={"wait": True}).get_json()["state"] == "done"
    assert pulls == [None, None]  # nothing to pull towards in the first round
    merged = org.post("/api/rounds/1/aggregate").get_json()
    assert merged["accepted"] == 2

    registry = organization_registry(org)
    info = registry.round(1)
    base = codec.decode_model(task, store.get(info.base_cid)).weights
    sent = {sub.client.lower(): codec.decode_delta(task, store.get(sub.cid), with_fisher=True)
            for sub in registry.submissions(1)}
    published = codec.decode_model(task, store.get(merged["model_cid"])).curvature
    assert published.round_id == 1 and set(published.scales) == set(sent)
    for c in clients:
        assert c.post("/api/participate", json={"wait": True}).get_json()["state"] == "done"
    addresses = [c.get("/api/status").get_json()["address"].lower() for c in clients]
    for address, others in zip(addresses, pulls[2:]):
        [(other, theirs)] = [(a, s) for a, s in sent.items() if a != address]
        expected = penalty.contribution(penalty.SentStatistics(1, base, theirs.delta, theirs.fisher),
                                        published.scales[other])
        for name in task.spec:
            np.testing.assert_allclose(others.fisher[name], expected.fisher[name], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(others.pull[name], expected.pull[name], rtol=1e-3, atol=1e-5)
