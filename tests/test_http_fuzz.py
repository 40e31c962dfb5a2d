"""Random and malformed requests to every endpoint of both apps: a 4xx with a message, never a 5xx."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.service import ClientConfig
from demo import embedded_system
from organization.service import OrganizationConfig

TASK = "digits"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """An organization with a deployed contract and an open round, and one enrolled client."""
    tmp = tmp_path_factory.mktemp("fuzz")
    system = embedded_system(tmp, OrganizationConfig(task=TASK), [ClientConfig(client_id=0, num_clients=2, task=TASK)])
    org, device = system.org.test_client(), system.clients[0].test_client()
    assert org.post("/api/deploy").status_code == 201
    address = device.get("/api/status").get_json()["address"]
    assert org.post("/api/clients", json={"address": address}).status_code == 200
    assert org.post("/api/rounds").status_code == 201
    for page in (org, device):  # each session now holds a real token that forged ones must not match
        assert 'name="csrf_token"' in page.get("/").get_data(as_text=True)
    return {"org": org, "client": device}


ORG_JSON = [("POST", "/api/deploy"), ("POST", "/api/clients"), ("POST", "/api/rounds"),
            ("POST", "/api/rounds/{n}/aggregate"), ("GET", "/api/status"), ("GET", "/api/rounds/{n}"),
            ("GET", "/api/history")]
CLIENT_JSON = [("POST", "/api/pull"), ("POST", "/api/train"), ("POST", "/api/publish"),
               ("POST", "/api/participate"), ("GET", "/api/status"), ("GET", "/api/job")]
ORG_FORMS = ["/deploy", "/clients", "/rounds", "/rounds/{n}/aggregate"]
CLIENT_FORMS = ["/pull", "/train", "/publish", "/participate"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
# The fields the endpoints read, with values of any type, plus unknown fields.
known_fields = st.dictionaries(st.sampled_from(["address", "wait", "round", "cid"]), json_values, max_size=3)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    known_fields.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=50).map(lambda t: ('{"address": "%s' % t).encode()),  # cut-off JSON
)
content_types = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x"])
round_ids = st.integers(min_value=0, max_value=2**70)


def check(answer) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.get_data(as_text=True)[:500])
    if answer.status_code >= 400:
        assert answer.get_data(as_text=True).strip()


@FUZZ
@given(endpoint=st.sampled_from([("org", *e) for e in ORG_JSON] + [("client", *e) for e in CLIENT_JSON]),
       round_id=round_ids, body=bodies, content_type=content_types)
def test_json_endpoints_never_answer_5xx(apps, endpoint, round_id, body, content_type):
    app, method, path = endpoint
    answer = apps[app].open(path.format(n=round_id), method=method, data=body, content_type=content_type)
    check(answer)
    if answer.status_code >= 400:
        assert answer.get_json()["error"]


@FUZZ
@given(endpoint=st.sampled_from([("org", p) for p in ORG_FORMS] + [("client", p) for p in CLIENT_FORMS]),
       round_id=round_ids,
       form=st.dictionaries(st.sampled_from(["csrf_token", "address"]) | st.text(max_size=12), st.text(max_size=40),
                            max_size=3))
def test_form_posts_with_random_fields_are_refused_with_400(apps, endpoint, round_id, form):
    app, path = endpoint
    answer = apps[app].post(path.format(n=round_id), data=form)
    assert answer.status_code == 400 and "security token" in answer.get_data(as_text=True)
