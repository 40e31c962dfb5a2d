"""Safetensors headers with arbitrary JSON in every field, pushed through the organization's whole
check-and-merge (its app on the embedded chain and store): every example must end with a verdict
for each update and a finalized round, never a 5xx."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo import embedded_system
from infra import chain
from organization.service import OrganizationConfig
from processor import codec
from processor.tasks import get_task

TASK = get_task("digits")
HONEST_KEY, ATTACKER_KEY = chain.DEV_KEYS[1], chain.DEV_KEYS[2]
HONEST, ATTACKER = (Account.from_key(k).address for k in (HONEST_KEY, ATTACKER_KEY))


@pytest.fixture(scope="module")
def org(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    app = embedded_system(tmp, OrganizationConfig(task=TASK.name, open_enrolment=True)).org
    web = app.test_client()
    assert web.post("/api/deploy").status_code == 201
    assert web.post("/api/rounds").status_code == 201
    return app


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
# Nesting far past what the decoder allows, and just under it.
deep = st.integers(1, 3000).map(lambda depth: {"deep": True, "depth": depth})
anything = json_values | deep


def rendered(value) -> bytes:
    if isinstance(value, dict) and value.get("deep") is True and set(value) == {"deep", "depth"}:
        return b"[" * value["depth"] + b"]" * value["depth"]
    return json.dumps(value).encode()


def honest_file(round_id: int, base_cid: str) -> bytes:
    rng = np.random.default_rng(round_id)
    delta = {n: (rng.normal(size=s) * 0.01).astype(np.float32) for n, s in TASK.spec.items()}
    return codec.encode_delta(TASK, delta, round_id=round_id, base_cid=base_cid, num_samples=50, client=HONEST)


@st.composite
def hostile_files(draw, round_id: int, base_cid: str) -> bytes:
    """An honest delta's file whose header has fields replaced by arbitrary JSON values."""
    valid = honest_file(round_id, base_cid)
    (size,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8:8 + size])
    header["__metadata__"]["client"] = ATTACKER
    parts: dict[str, bytes] = {key: json.dumps(value).encode() for key, value in header.items()}
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3, unique=True)):
        where = draw(st.sampled_from(["whole", "field"]))
        if where == "whole" or not header[key]:
            parts[key] = rendered(draw(anything))
        else:  # one field of the entry
            field = draw(st.sampled_from(sorted(header[key])))
            entry = {k: json.dumps(v).encode() for k, v in header[key].items()}
            entry[field] = rendered(draw(anything))
            parts[key] = b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in entry.items()) + b"}"
    for key, value in draw(st.dictionaries(st.text(max_size=10), anything, max_size=2)).items():
        parts[key] = rendered(value)
    body = b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in parts.items()) + b"}"
    return struct.pack("<Q", len(body)) + body + valid[8 + size:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_any_header_ends_in_a_verdict_and_a_finalized_round(org, data):
    service = org.extensions["organization"]
    registry, store = service.registry, service.store
    round_id = registry.current_round()
    base_cid = registry.round(round_id).base_cid
    hostile = data.draw(hostile_files(round_id, base_cid))  # everything drawn before the chain is touched
    claimed = data.draw(st.integers(1, chain.DEFAULT_MAX_SAMPLES))
    registry.submit_update(HONEST_KEY, round_id, store.add(honest_file(round_id, base_cid)), 50)
    registry.submit_update(ATTACKER_KEY, round_id, store.add(hostile), claimed)

    answer = org.test_client().post(f"/api/rounds/{round_id}/aggregate")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:500]
    verdicts = answer.get_json()["verdicts"]
    assert set(verdicts) == {HONEST, ATTACKER}
    assert verdicts[HONEST]["accepted"], verdicts[HONEST]
    assert verdicts[ATTACKER]["accepted"] or verdicts[ATTACKER]["reason"]
    assert registry.round(round_id).finalized and registry.current_round() == round_id + 1
