"""The contract is compiled once, into its build artifact; running apps only read it."""
from __future__ import annotations

import json
import socket
import sys
import threading

import psutil
import pytest
import requests

from infra import chain
from infra.files import REPO_ROOT
from infra.processes import ManagedProcess, http_answers


def test_compiling_writes_a_truffle_artifact_and_keeps_its_deployments(tmp_path):
    path = tmp_path / "RoundRegistry.json"
    path.write_text(json.dumps({"networks": {"5777": {"address": "0x" + "12" * 20}}}))
    assert chain.compile_artifact(path) == path
    artifact = json.loads(path.read_text())
    assert artifact["contractName"] == "RoundRegistry" and artifact["bytecode"] == chain.load_artifact()[1]
    assert artifact["source"] == chain.CONTRACT_SOURCE.read_text()
    assert artifact["networks"] == {"5777": {"address": "0x" + "12" * 20}}
    abi, bytecode = chain.load_artifact(path)
    assert (abi, bytecode) == chain.load_artifact()  # the same compiler settings as the repository's build
    assert {"closeRound", "submitUpdate", "finalizeRound"} <= {e.get("name") for e in abi}


def test_a_missing_or_stale_artifact_is_an_error_that_says_how_to_build_it(tmp_path):
    with pytest.raises(chain.ArtifactError, match="is missing: build the contract with `bash setup.sh`"):
        chain.load_artifact(tmp_path / "absent.json")
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"abi": [], "bytecode": "0x00", "source": "contract Old {}"}))
    with pytest.raises(chain.ArtifactError, match="built from another version of RoundRegistry.sol"):
        chain.load_artifact(stale)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def solc_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("solc" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_running_app_never_starts_solc_even_under_concurrent_requests(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = ManagedProcess("organization", [sys.executable, str(REPO_ROOT / "run.py"), "app", "--task", "digits",
                                          "--port", str(port)],
                         lambda: http_answers(f"{url}/api/status"), log_path=tmp_path / "app.log",
                         env={"FL_CHAIN_URL": "embedded", "FL_IPFS_API": "embedded", "FL_STATE_DIR": str(tmp_path),
                              "FL_CONTRACT_RECORD": str(tmp_path / "deployments.json")},
                         cwd=REPO_ROOT, ready_timeout=180)
    answers, seen = [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.extend(solc_processes())

    def ask():
        answers.append(requests.get(f"{url}/api/status", timeout=60).status_code)

    watcher = threading.Thread(target=watch)
    watcher.start()  # from the app's start: it deploys the contract and answers with no compiler
    app.start()
    try:
        assert requests.post(f"{url}/api/deploy", timeout=60).status_code == 201
        askers = [threading.Thread(target=ask) for _ in range(20)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
    finally:
        stop.set()
        watcher.join()
        app.stop()
    assert answers == [200] * 20
    assert seen == []
