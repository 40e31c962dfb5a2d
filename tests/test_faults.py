"""Services killed and restarted mid-round, with the real processes: Ganache, the js-ipfs daemon, the
organization and the clients each run as their own process (`run.py app`, `run.py client`).

Every test ends with its round completed exactly once: the chain records every honest submission
once, the round finalized once (one RoundFinalized event) and the next round started from its model.
Meanwhile the apps answer 503 with a message and their pages show the outage.

Retries: the organization retries a refused chain or IPFS call 6 times with doubling waits (about
30 s in all), long enough to ride out a restart; the clients retry once, so their outage answers come
quickly. Ports 8750 (Ganache), 5210 (IPFS API) and 5220-5222 (apps) keep clear of other test sessions.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest
import requests
from eth_account import Account

from infra import chain, ipfs
from infra.files import REPO_ROOT
from infra.processes import ManagedProcess, http_answers
from tests.fixtures.dies_before_finalizing import FAULT_EXIT_STATUS

pytestmark = [pytest.mark.fault, pytest.mark.slow]

GANACHE_URL = "http://127.0.0.1:8750"
IPFS_API_PORT = 5210
ORG_PORT, CLIENT_PORTS = 5220, (5221, 5222)
TASK = "digits"
ORG_KEY, CLIENT_KEYS = chain.DEV_KEYS[0], chain.DEV_KEYS[1:3]
CLIENTS = [Account.from_key(key).address for key in CLIENT_KEYS]
RETRIES = {"org": {"FL_RETRIES": "6", "FL_RETRY_BACKOFF": "0.5"},
           "client": {"FL_RETRIES": "1", "FL_RETRY_BACKOFF": "0.2"}}


class Stack:
    """The processes of one small system, each of which a test may kill and start again."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.ganache = chain.Ganache(GANACHE_URL, db_dir=folder / "chain", log_path=folder / "logs" / "ganache.log")
        self.ipfs = ipfs.IPFSDaemon(folder / "ipfs", api_port=IPFS_API_PORT,
                                       gateway_port=ipfs.gateway_port_for(IPFS_API_PORT),
                                       log_path=folder / "logs" / "ipfs.log")
        self.record = folder / "deployments.json"
        self.org: ManagedProcess | None = None
        self.clients: list[ManagedProcess | None] = [None, None]

    def env(self, role: str) -> dict[str, str]:
        return {"FL_CHAIN_URL": GANACHE_URL, "FL_IPFS_API": self.ipfs.api_url, "FL_CONTRACT_RECORD": str(self.record),
                "FL_STATE_DIR": str(self.folder / "state"), "FL_TIMEOUT": "10", "TF_CPP_MIN_LOG_LEVEL": "2",
                **RETRIES[role]}

    def _app(self, name: str, role: str, port: int, args: list[str],
             entry: list[str] | None = None) -> ManagedProcess:
        url = f"http://127.0.0.1:{port}"
        assert not http_answers(url), f"something already listens at {url}"
        entry = entry or [str(REPO_ROOT / "run.py")]
        return ManagedProcess(name, [sys.executable, *entry, *args, "--port", str(port)],
                              is_ready=lambda: http_answers(url + "/api/status", timeout=10),
                              log_path=self.folder / "logs" / f"{name}.log",
                              env=self.env(role), cwd=REPO_ROOT, ready_timeout=180)

    def org_process(self, entry: list[str] | None = None) -> ManagedProcess:
        """The organization, started by run.py or by `entry` (a fault-injecting launcher)."""
        return self._app("organization", "org", ORG_PORT, ["app", "--task", TASK, "--epochs", "2"], entry)

    def client_process(self, k: int, entry: list[str] | None = None) -> ManagedProcess:
        """Client k, started by run.py or by `entry` (a fault-injecting launcher)."""
        return self._app(f"client-{k}", "client", CLIENT_PORTS[k],
                         ["client", "--id", str(k), "--clients", "2", "--task", TASK, "--manual"], entry)

    def start_apps(self, processes: list[ManagedProcess]) -> None:
        """Start app processes side by side (each spends most of its start importing TensorFlow)."""
        failures = []

        def start(process):
            try:
                process.start()
            except Exception as exc:
                failures.append(exc)

        threads = [threading.Thread(target=start, args=(p,)) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("faults"))
    try:
        stack.ganache.start()
        stack.ipfs.start()
        assert not stack.ganache.reused and not stack.ipfs.reused, "another session uses the fault-test ports"
        w3 = chain.connect(GANACHE_URL)
        registry = chain.deploy_registry(w3, ORG_KEY)
        chain.record_deployment(stack.record, w3, registry.address)
        for address in CLIENTS:
            registry.add_client(ORG_KEY, address)
        stack.registry = registry
        stack.org = stack.org_process()
        stack.clients = [stack.client_process(k) for k in range(2)]
        stack.start_apps([stack.org, *stack.clients])
        assert post(ORG_PORT, "/api/rounds").status_code == 201
        yield stack
    finally:
        for process in [stack.org, *stack.clients, stack.ipfs, stack.ganache]:
            if process is not None:
                process.stop()


def url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def post(port: int, path: str, body: dict | None = None) -> requests.Response:
    return requests.post(url(port, path), json=body, timeout=300)


def get(port: int, path: str) -> requests.Response:
    return requests.get(url(port, path), timeout=60)


def participate(k: int) -> requests.Response:
    return post(CLIENT_PORTS[k], "/api/participate", {"wait": True})


def aggregate_in_background(round_id: int) -> tuple[threading.Thread, list[requests.Response]]:
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(post(ORG_PORT, f"/api/rounds/{round_id}/aggregate")))
    thread.start()
    return thread, answers


def assert_outage_answer(answer: requests.Response, words: str) -> None:
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert words in answer.json()["error"]


def assert_completed_once(registry: chain.Registry, round_id: int) -> None:
    """The chain's record of `round_id`: both clients once, finalized once, the next round from its model."""
    info = registry.round(round_id)
    assert info.finalized and info.submissions == 2
    assert sorted(s.client for s in registry.submissions(round_id)) == sorted(CLIENTS)
    submitted = [e for e in registry.events("UpdateSubmitted") if e["args"]["round"] == round_id]
    finalized = [e for e in registry.events("RoundFinalized") if e["args"]["round"] == round_id]
    assert len(submitted) == 2 and len(finalized) == 1
    assert finalized[0]["args"]["modelCid"] == info.model_cid
    assert registry.current_round() == round_id + 1 and registry.round(round_id + 1).base_cid == info.model_cid
    assert [e["args"]["round"] for e in registry.events("RoundStarted")] == list(range(1, round_id + 2))


def test_ipfs_daemon_killed_mid_round_and_restarted(stack):
    round_id = stack.registry.current_round()
    assert participate(0).status_code == 200
    stack.ipfs.kill()

    assert_outage_answer(participate(1), "no IPFS daemon answers")
    assert "down.</span> The IPFS node at" in get(ORG_PORT, "/").text
    assert "down.</span> The IPFS node at" in get(CLIENT_PORTS[1], "/").text
    assert not stack.registry.has_submitted(round_id, CLIENTS[1])

    stack.ipfs.start()  # same repo: everything added before the crash is still there
    assert participate(1).status_code == 200
    stack.ipfs.kill()
    # The organization retries with backoff while IPFS restarts, and then completes the round.
    thread, answers = aggregate_in_background(round_id)
    time.sleep(1.0)
    assert thread.is_alive()  # waiting, not failed
    stack.ipfs.start()
    thread.join()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["accepted"] == 2  # the outage rejected no update
    assert_completed_once(stack.registry, round_id)


def test_ganache_restarted_mid_round_keeps_the_round(stack):
    round_id = stack.registry.current_round()
    assert participate(0).status_code == 200
    stack.ganache.stop()

    assert_outage_answer(participate(1), "stopped answering")
    assert_outage_answer(get(ORG_PORT, f"/api/rounds/{round_id}"), "stopped answering")
    assert "down.</span> The chain at" in get(ORG_PORT, "/").text
    assert "down.</span> The chain at" in get(CLIENT_PORTS[1], "/").text

    stack.ganache.start()  # the same database folder: the chain carries on where it stopped
    assert stack.registry.has_submitted(round_id, CLIENTS[0])
    assert participate(1).status_code == 200
    stack.ganache.stop()
    thread, answers = aggregate_in_background(round_id)
    time.sleep(1.0)
    assert thread.is_alive()
    stack.ganache.start()
    thread.join()
    assert answers[0].status_code == 200, answers[0].text
    assert_completed_once(stack.registry, round_id)


def test_organization_killed_before_finalizing_then_restarted(stack):
    """A launcher of the tests' own (tests/fixtures/dies_before_finalizing.py) makes the organization
    exit at the worst moment, every time: deltas fetched and merged, the model published to IPFS,
    the round closed but not finalized on chain. (Killing it from outside then would be a race.)"""
    round_id = stack.registry.current_round()
    for k in range(2):
        assert participate(k).status_code == 200
    stack.org.stop()
    stack.org = stack.org_process(entry=["-m", "tests.fixtures.dies_before_finalizing"])
    stack.org.start()
    with pytest.raises(requests.ConnectionError):
        post(ORG_PORT, f"/api/rounds/{round_id}/aggregate")
    stack.org.process.wait(timeout=30)
    assert stack.org.process.returncode == FAULT_EXIT_STATUS
    assert not stack.registry.round(round_id).finalized
    status = get(CLIENT_PORTS[0], "/api/status").json()
    assert status["round"]["round"] == round_id and status["round"]["submitted"]

    stack.org.stop()
    stack.org = stack.org_process()
    stack.org.start()
    answer = post(ORG_PORT, f"/api/rounds/{round_id}/aggregate")
    assert answer.status_code == 200, answer.text
    assert post(ORG_PORT, f"/api/rounds/{round_id}/aggregate").status_code == 409  # never twice
    assert_completed_once(stack.registry, round_id)


def test_client_killed_mid_training_then_retried(stack):
    round_id = stack.registry.current_round()
    assert participate(0).status_code == 200
    stack.clients[1].stop()
    stack.clients[1] = stack.client_process(1, entry=["-m", "tests.fixtures.slow_client"])  # caught training
    stack.clients[1].start()
    assert post(CLIENT_PORTS[1], "/api/participate").status_code == 202
    deadline = time.monotonic() + 120
    while True:
        job = get(CLIENT_PORTS[1], "/api/job").json()
        assert job["state"] == "running", job
        if job["step"] == "train" and job["progress"].get("epoch", 0) >= 1:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    stack.clients[1].kill()
    assert not stack.registry.has_submitted(round_id, CLIENTS[1])  # nothing half-published

    stack.clients[1] = stack.client_process(1)
    stack.clients[1].start()
    assert participate(1).status_code == 200
    assert participate(1).status_code == 409  # already submitted: nothing doubled
    assert post(ORG_PORT, f"/api/rounds/{round_id}/aggregate").status_code == 200
    assert_completed_once(stack.registry, round_id)
