"""Requests an attacker would send to the apps, and inputs that used to kill a process."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from client.service import ClientConfig
from demo import embedded_system
from infra import webapp
from infra.settings import EMBEDDED, Settings
from organization.service import OrganizationConfig

TASK = "digits"
BODY_CAP = 64 * 1024


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    system = embedded_system(tmp, OrganizationConfig(task=TASK), [ClientConfig(client_id=0, num_clients=2, task=TASK)])
    org, device = system.org, system.clients[0]
    assert org.test_client().post("/api/deploy").status_code == 201
    return {"org": org, "client": device}


@pytest.mark.parametrize("app", ["org", "client"])
@pytest.mark.parametrize("size", [65_000, BODY_CAP])
def test_deeply_nested_json_bodies_up_to_the_cap_get_400(apps, app, size):
    path = "/api/clients" if app == "org" else "/api/participate"
    answer = apps[app].test_client().post(path, data=b"[" * size, content_type="application/json")
    assert answer.status_code == 400, answer.get_data(as_text=True)[:200]
    assert answer.get_json()["error"]


@pytest.mark.parametrize("app", ["org", "client"])
def test_a_body_over_the_cap_gets_413(apps, app):
    answer = apps[app].test_client().post("/api/status", data=b"[" * (BODY_CAP + 1), content_type="application/json")
    assert answer.status_code == 413


def test_the_recursion_limit_that_web3_raises_is_put_back_so_deep_json_cannot_overflow_a_stack():
    """py_ecc (through web3) sets the limit to 100,000; the standard decoder then overflowed the
    stack of a thread (a segfault) on 100,000 nested brackets. Now it raises RecursionError."""
    program = (
        "import json, sys, threading\n"
        "from infra import chain\n"
        "assert sys.getrecursionlimit() == chain.RECURSION_LIMIT, sys.getrecursionlimit()\n"
        "def decode():\n"
        "    try:\n"
        "        json.loads('[' * 100_000 + ']' * 100_000)\n"
        "    except RecursionError:\n"
        "        print('refused')\n"
        "decode()\n"
        "worker = threading.Thread(target=decode); worker.start(); worker.join()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["refused", "refused"]


@pytest.mark.parametrize("app", ["org", "client"])
def test_a_host_outside_the_allowlist_gets_400_and_does_nothing(apps, app):
    """DNS rebinding: a foreign page whose name now resolves to 127.0.0.1 sends its own name as
    Host and as Origin; the Origin check alone let it through."""
    foreign = apps[app].test_client()
    headers = {"Host": "attacker.example:5000", "Origin": "http://attacker.example:5000"}
    if app == "org":
        before = apps["org"].extensions["organization"].registry.events("ClientAdded")
        answer = foreign.post("/api/clients", json={"address": "0x" + "ab" * 20}, headers=headers)
        assert apps["org"].extensions["organization"].registry.events("ClientAdded") == before
    else:
        answer = foreign.post("/api/participate", json={"wait": False}, headers=headers)
    assert answer.status_code == 400
    for host in ("localhost:5000", "127.0.0.1:5100"):
        assert apps[app].test_client().get("/api/status", headers={"Host": host}).status_code == 200


def test_the_allowed_hosts_come_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_ALLOWED_HOSTS", "fl.example.org, 10.0.0.5")
    settings = Settings.from_env(state_dir=tmp_path, chain_url=EMBEDDED, ipfs_api=EMBEDDED)
    assert settings.allowed_hosts == ("fl.example.org", "10.0.0.5")
    monkeypatch.delenv("FL_ALLOWED_HOSTS")
    assert Settings.from_env().allowed_hosts == ("localhost", "127.0.0.1")


@pytest.mark.parametrize("round_id", [2**256, 2**256 + 5, 10**90])
def test_round_numbers_beyond_uint256_are_404(apps, round_id):
    org = apps["org"].test_client()
    for answer in (org.get(f"/api/rounds/{round_id}"), org.post(f"/api/rounds/{round_id}/aggregate")):
        assert answer.status_code == 404 and "does not exist" in answer.get_json()["error"]


@pytest.fixture()
def served(apps):
    """The organization app behind the real (threaded) HTTP server the processes run."""
    server = webapp.http_server(apps["org"], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.port
    server.shutdown()


def raw_request(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_body_that_never_arrives_holds_a_worker_only_until_the_read_timeout(served):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served), timeout=60) as stalled:
        stalled.sendall(b"POST /api/clients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n")
        # other requests are served meanwhile
        assert raw_request(served, b"GET /api/history HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                           ).startswith(b"HTTP/1.1 200")
        while stalled.recv(65536):  # the server gives up on the body and closes the connection
            pass
    waited = time.monotonic() - started
    assert webapp.BoundedRequestHandler.timeout - 1 <= waited <= webapp.BoundedRequestHandler.timeout + 10


def test_a_chunked_body_over_the_cap_gets_413(served):
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(BODY_CAP // len(chunk) + 2)) + b"0\r\n\r\n"
    answer = raw_request(served, b"POST /api/clients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
