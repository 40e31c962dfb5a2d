"""Bad and malicious updates, each submitted with a real key to the real Ganache chain and IPFS daemon.

The organization runs as its Flask app on the same chain and node. Every bad update must be rejected
with its own reason (API and dashboard), the round must complete with the honest clients, and the
result must match an honest-only round computed here with the processor's functions.
"""
from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
from eth_account import Account
from markupsafe import escape
from safetensors.numpy import save

import chain
import organization
import storage
from processor import codec, rounds
from processor.tasks import get_task
from organization.service import OrganizationConfig
from settings import Settings

pytestmark = [pytest.mark.attack, pytest.mark.ganache, pytest.mark.ipfs_daemon]

TASK = get_task("digits")
HONEST_KEYS = chain.DEV_KEYS[1:3]
ATTACKER_KEYS = chain.DEV_KEYS[3:17]
POISONER_KEY = chain.DEV_KEYS[17]
UPDATE_CAP = 32 * 1024  # an honest digits delta is about 10 KB
CLIP_NORM = 3.0  # honest digits deltas have L2 norm about 1.5: clipping leaves them alone
FETCH_TIMEOUT = 2.0


def address(key: str) -> str:
    return Account.from_key(key).address


@pytest.fixture(scope="module")
def org(tmp_path_factory, ganache_url, ipfs_api):
    """The organization's app on the session chain and IPFS node, with its round registry and clients."""
    tmp = tmp_path_factory.mktemp("attacks")
    config = OrganizationConfig(task=TASK.name, max_update_bytes=UPDATE_CAP, fetch_timeout=FETCH_TIMEOUT,
                                clip_norm=CLIP_NORM)
    app = organization.create_app({
        "SETTINGS": Settings.from_env(state_dir=tmp, chain_url=ganache_url, ipfs_api=ipfs_api,
                                      contract_record=tmp / "deployments.json"),
        "W3": chain.connect(ganache_url), "STORE": storage.open_store(ipfs_api, tmp), "ORG_CONFIG": config,
    }).test_client()
    assert app.post("/api/deploy").status_code == 201
    for key in [*HONEST_KEYS, *ATTACKER_KEYS, POISONER_KEY]:
        assert app.post("/api/clients", json={"address": address(key)}).status_code == 200
    assert app.post("/api/rounds").status_code == 201
    return app


def service(org):
    return org.application.extensions["organization"]


def open_base(org) -> tuple[int, str, dict, dict]:
    registry = service(org).registry
    round_id = registry.current_round()
    base_cid = registry.round(round_id).base_cid
    weights, fisher, _ = codec.decode_model(TASK, service(org).store.get(base_cid))
    return round_id, base_cid, weights, fisher


def honest_update(weights, fisher, client_id: int, seed: int = 0) -> rounds.LocalResult:
    x, y = TASK.client_data(client_id, 2, scheme="iid", seed=0)
    return rounds.local_update(TASK, weights, fisher, x, y, lam=0.0, epochs=2, batch_size=32, lr=0.1, seed=seed)


def submit(org, key: str, round_id: int, data: bytes, num_samples: int) -> str:
    cid = service(org).store.add(data)
    service(org).registry.submit_update(key, round_id, cid, num_samples)
    return cid


def delta_file(tensors: dict[str, np.ndarray], **metadata) -> bytes:
    """Safetensors bytes with the given tensors and a delta's metadata (any field overridable)."""
    return save(tensors, metadata={k: str(v) for k, v in metadata.items()})


def test_bad_updates_are_rejected_and_the_honest_round_completes(org, tmp_path):
    round_id, base_cid, weights, fisher = open_base(org)
    honest = [honest_update(weights, fisher, k) for k in range(2)]
    for key, update in zip(HONEST_KEYS, honest):
        data = codec.encode_delta(TASK, update.delta, round_id=round_id, base_cid=base_cid,
                                  num_samples=update.num_samples, client=address(key))
        submit(org, key, round_id, data, update.num_samples)

    template = {f"delta/{n}": t for n, t in honest[0].delta.items()}
    samples = honest[0].num_samples

    def meta(key, **changes):
        return {"format": codec.FORMAT, "kind": "delta", "task": TASK.name, "arch": TASK.arch_id,
                "round": round_id, "base_cid": base_cid, "num_samples": samples, "client": address(key),
                "dtype": "float32", **changes}

    def changed(name, value):
        return {**template, name: value}

    kernel = "delta/hidden_0/kernel"
    marker = tmp_path / "unpickled"
    valid = lambda key, **m: delta_file(template, **meta(key, **m))  # noqa: E731

    class Payload:  # unpickling this would create `marker`: the proof that nothing unpickles
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    # (attack, the file or, for content IPFS lacks, None, words the rejection reason must contain)
    attacks = [
        ("NaN", lambda k: delta_file(changed(kernel, np.full_like(template[kernel], np.nan)), **meta(k)),
         "non-finite"),
        ("Inf", lambda k: delta_file(changed(kernel, np.full_like(template[kernel], np.inf)), **meta(k)),
         "non-finite"),
        ("wrong shape", lambda k: delta_file(changed(kernel, np.zeros((64, 33), np.float32)), **meta(k)),
         "has shape (64, 33), expected (64, 32)"),
        ("wrong dtype", lambda k: delta_file({n: t.astype(np.float64) for n, t in template.items()}, **meta(k)),
         "has dtype F64"),
        ("extra tensor", lambda k: delta_file(changed("delta/backdoor", np.ones(3, np.float32)), **meta(k)),
         "unknown tensor(s): delta/backdoor"),
        ("missing tensor", lambda k: delta_file({n: t for n, t in template.items() if n != kernel}, **meta(k)),
         "missing tensor(s): delta/hidden_0/kernel"),
        ("huge norm (x1e6)", lambda k: delta_file({n: t * 1e6 for n, t in template.items()}, **meta(k)),
         "exceeds the bound"),
        ("wrong round", lambda k: valid(k, round=round_id + 1), f"for round {round_id + 1}, expected round {round_id}"),
        ("wrong base CID", lambda k: valid(k, base_cid=storage.compute_cid(b"another base")), "trained from base"),
        ("garbage bytes", lambda k: np.random.default_rng(1).bytes(4096), "not a safetensors file"),
        ("truncated safetensors", lambda k: valid(k)[:-100], "corrupt safetensors file"),
        ("CID not on IPFS", None, f"took more than {FETCH_TIMEOUT:g} s"),
        ("over the size cap", lambda k: valid(k, padding="x" * UPDATE_CAP), f"more than the {UPDATE_CAP} bytes"),
        ("pickle", lambda k: pickle.dumps({"delta": template, "payload": Payload()}), "not a safetensors file"),
    ]
    assert len(attacks) == len(ATTACKER_KEYS)
    registry = service(org).registry
    for (name, make, _), key in zip(attacks, ATTACKER_KEYS):
        if make is None:  # a CID nobody serves: the fetch must time out, not hang
            registry.submit_update(key, round_id, storage.compute_cid(b"never added " + key.encode()), samples)
        else:
            submit(org, key, round_id, make(key), samples)

    result = org.post(f"/api/rounds/{round_id}/aggregate")
    assert result.status_code == 200, result.get_json()
    result = result.get_json()
    assert result["accepted"] == 2 and result["submissions"] == 2 + len(attacks)

    view = org.get(f"/api/rounds/{round_id}").get_json()
    assert view["finalized"]
    verdicts = {s["client"]: s["verdict"] for s in view["submissions"]}
    page = org.get("/").get_data(as_text=True)
    for key in HONEST_KEYS:
        assert verdicts[address(key)] == {"accepted": True, "reason": None}
    for (name, _, reason), key in zip(attacks, ATTACKER_KEYS):
        verdict = verdicts[address(key)]
        assert not verdict["accepted"] and reason in verdict["reason"], (name, verdict)
        assert result["verdicts"][address(key)] == verdict
        assert f"rejected: {escape(verdict['reason'])}" in page, name
    assert not marker.exists()

    # The published model is the honest-only round, computed here from the same base and deltas.
    honest_only = rounds.aggregate(weights, [(u.delta, u.num_samples) for u in honest])
    data = TASK.data()
    expected = TASK.evaluate(honest_only, data.x_test, data.y_test)["accuracy"]
    published, _, _ = codec.decode_model(TASK, service(org).store.get(view["model_cid"]))
    accuracy = TASK.evaluate(published, data.x_test, data.y_test)["accuracy"]
    assert accuracy == pytest.approx(result["metrics"]["accuracy"])
    assert abs(accuracy - expected) <= 0.01, (accuracy, expected)
    assert expected > TASK.evaluate(weights, data.x_test, data.y_test)["accuracy"] + 0.1  # the round did learn


def test_a_scaled_update_is_bounded_by_norm_clipping(org):
    """One client sends an honest-looking update scaled by 50: under the validation norm bound, so
    only the configured robust aggregation (clipping at CLIP_NORM) stands between it and the model."""
    round_id, base_cid, weights, fisher = open_base(org)
    honest = [honest_update(weights, fisher, k, seed=round_id) for k in range(2)]
    poisoned = honest_update(weights, fisher, 0, seed=99)
    poisoned.delta = {n: t * 50 for n, t in poisoned.delta.items()}
    for key, update in [*zip(HONEST_KEYS, honest), (POISONER_KEY, poisoned)]:
        data = codec.encode_delta(TASK, update.delta, round_id=round_id, base_cid=base_cid,
                                  num_samples=update.num_samples, client=address(key))
        submit(org, key, round_id, data, update.num_samples)

    result = org.post(f"/api/rounds/{round_id}/aggregate").get_json()
    assert result["accepted"] == 3  # it passes validation: the defence is in the merge
    with_clipping = result["metrics"]["accuracy"]

    data = TASK.data()

    def accuracy_of(updates, **options) -> float:
        merged = rounds.aggregate(weights, [(u.delta, u.num_samples) for u in updates], **options)
        return TASK.evaluate(merged, data.x_test, data.y_test)["accuracy"]

    honest_only = accuracy_of(honest)
    undefended = accuracy_of([*honest, poisoned])
    median = accuracy_of([*honest, poisoned], method="median")
    print(f"\nround {round_id}: honest only {honest_only:.4f}, 50x update with plain FedAvg {undefended:.4f}, "
          f"clipped at {CLIP_NORM} {with_clipping:.4f}, coordinate median {median:.4f}")
    assert undefended < honest_only - 0.1  # the attack works without a defence ...
    assert with_clipping >= honest_only - 0.05  # ... and clipping bounds it to a few points
    assert median >= honest_only - 0.05
