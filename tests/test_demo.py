"""The demo, end to end: embedded in one process, and as the real stack of separate processes; its
port checks, and how it reports an app process that died."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from flask import Flask
from tqdm import tqdm

import demo
from demo import DemoError, DemoOptions, HttpEndpoint, ProcessEnded, free_port, run_demo
from infra import chain, ipfs
from infra.files import REPO_ROOT
from infra.processes import ManagedProcess, ServiceError, port_listens
from infra.settings import Settings
from infra.webapp import WaitressServer
from processor import codec
from processor.tasks import get_task
from processor.training import TrainingSettings

TASK = "digits"


def check_report(report: dict, rounds: int, clients: int) -> None:
    assert [row["round"] for row in report["rounds"]] == list(range(1, rounds + 1))
    assert all(row["submissions"] == clients for row in report["rounds"])
    assert all(row["gas"] > 0 and row["bytes"] > 0 for row in report["rounds"])
    # training alone keeps a core busy most of the round (cpu_seconds counts every core of the machine)
    assert all(row["cpu_seconds"] >= 0.3 * row["seconds"] for row in report["rounds"]), report["rounds"]
    assert report["rounds"][-1]["accuracy"] > report["initial_accuracy"] + 0.2


def test_embedded_demo_runs_every_role_in_one_process(tmp_path, capsys):
    options = DemoOptions(task=TASK, clients=2, rounds=2, training=TrainingSettings(epochs=3), embedded=True,
                          json_path=tmp_path / "report.json", plot_path=tmp_path / "accuracy.png")
    report = run_demo(options, Settings.from_env(state_dir=tmp_path))
    check_report(report, rounds=2, clients=2)
    # every accuracy beside the trivial baseline: always the test set's most common digit
    test_labels = get_task(TASK).data().y_test
    assert report["baseline"]["accuracy"] == pytest.approx(np.bincount(test_labels).max() / len(test_labels))
    assert f" base {100 * report['baseline']['accuracy']:8.2f}%  always answering the digit " in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cores, processes, threads", [(2, 5, "1"), (8, 2, "4"), (8, 3, "2"), (1, 1, "1")])
def test_each_process_of_the_stack_gets_its_share_of_the_cores(monkeypatch, cores, processes, threads):
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    pools = demo.compute_threads(processes)
    assert set(pools) == {"TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OPENBLAS_NUM_THREADS"}
    assert set(pools.values()) == {threads}


@pytest.mark.e2e
@pytest.mark.ganache
@pytest.mark.ipfs_daemon
def test_full_stack_runs_by_itself_with_a_straggler_and_a_late_joiner(tmp_path, ganache_url, ipfs_api, monkeypatch):
    """Ganache, the IPFS daemon, the organization and three clients, each its own process, and no
    HTTP call to any app: the organization runs three rounds, client 1 trains past every deadline
    and the contract refuses its updates, client 2 joins after round 1 and takes part from round 3.
    The rounds are FedCurv's: every update carries its Fisher, every next base the merged ones' sum."""
    app_calls, request = [], demo.requests.request
    app_ports = {5400, 5410, 5411, 5412}

    def counted(method, url, *args, **kwargs):
        if urlsplit(url).port in app_ports:
            app_calls.append(url)
        return request(method, url, *args, **kwargs)

    monkeypatch.setattr(demo.requests, "request", counted)
    settings = Settings.from_env(state_dir=tmp_path, chain_url=ganache_url, ipfs_api=ipfs_api)
    plan = TrainingSettings(epochs=3, regularizer="fedcurv", ewc_lambda=0.3)
    options = DemoOptions(task=TASK, clients=3, rounds=3, training=plan, round_seconds=10,
                          plot_path=tmp_path / "accuracy.png", org_port=5400, first_client_port=5410)
    report = run_demo(options, settings)
    assert app_calls == [], "the demo drove an app over HTTP"
    rows = report["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["submissions"] for row in rows] == [1, 1, 2]  # client 0; then client 2 from round 3 on
    assert rows[-1]["accuracy"] > report["initial_accuracy"] + 0.2
    # Rounds 1 and 2 waited for the straggler until their deadline, and no longer.
    assert all(10 <= row["seconds"] <= 16 for row in rows[:2]), rows
    for row in rows[:2]:
        [refused] = row["refused"]
        assert refused["client"] == "client 1" and "RoundRegistry reverted" in refused["reason"]
    assert rows[0]["federated"]["devices"] == 1  # client 0 evaluated round 1's model in round 2

    w3 = chain.connect(ganache_url)
    registry = chain.Registry(w3, chain.find_deployment(w3, tmp_path / "demo" / "deployments.json"))
    store = ipfs.open_store(ipfs_api, tmp_path)
    task = get_task(TASK)
    data = task.data()
    submitters = {}
    for round_id in (1, 2, 3):
        info = registry.round(round_id)
        assert info.finalized and info.deadline > 0
        submitters[round_id] = sorted(sub.client for sub in registry.submissions(round_id))
        for sub in registry.submissions(round_id):  # IPFS holds exactly those files, which decode
            codec.decode_delta(task, store.get(sub.cid), expected_round=round_id, expected_base_cid=info.base_cid,
                               with_fisher=True)
        weights, _, _, curvature = codec.decode_model(task, store.get(info.model_cid))
        assert curvature.round_id == round_id and set(curvature.scales) == {c.lower() for c in submitters[round_id]}
        accuracy = task.evaluate(weights, data.x_test, data.y_test)["accuracy"]
        assert accuracy == pytest.approx(rows[round_id - 1]["accuracy"])
    clients = [chain.client_address(k) for k in range(3)]
    assert submitters == {1: [clients[0]], 2: [clients[0]], 3: sorted([clients[0], clients[2]])}


def listening(port: int) -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    return holder


def test_the_demo_stops_before_anything_starts_when_a_port_is_in_use(tmp_path):
    """Through the command line: the organization's port is taken, so the demo says which port and
    which flag moves it, in one line, and starts no chain."""
    port, chain_port = free_port(0), free_port(0)
    with listening(port):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "demo", "--port", str(port),
                               "--chain-url", f"http://127.0.0.1:{chain_port}", "--ipfs-api", "http://127.0.0.1:9",
                               "--state-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"demo stopped: port {port} (the organization's) is in use (Address already in use): stop what listens "
        "there, or choose another with --port")
    assert not port_listens(chain_port) and not (tmp_path / "demo").exists()


def test_a_clients_port_in_use_names_the_client_and_its_flag(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(demo.chain, "Ganache", lambda *args, **kwargs: started.append(args))
    first = free_port(0)
    with listening(first + 1):
        with pytest.raises(DemoError, match=rf"^port {first + 1} \(client 1's\) is in use .* with --client-port"):
            run_demo(DemoOptions(clients=3, org_port=free_port(0), first_client_port=first),
                     Settings.from_env(state_dir=tmp_path))
    assert started == []


def test_a_port_that_an_earlier_run_left_in_time_wait_is_used():
    """An earlier run's app closed its connections first, so they wait in TIME_WAIT on its port: a
    plain bind is refused there, the demo's check and the next app's server (SO_REUSEADDR) are not."""
    earlier = WaitressServer(Flask(__name__), "127.0.0.1", 0)
    threading.Thread(target=earlier.serve_forever, daemon=True).start()
    port = earlier.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as browser:
        browser.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while browser.recv(65536):  # until the server has closed its end: it closed first
            pass
    earlier.shutdown()
    with socket.socket() as plain, pytest.raises(OSError, match="Address already in use"):
        plain.bind(("127.0.0.1", port))
    demo.check_port(port, "the organization's", "--port")
    following = WaitressServer(Flask(__name__), "127.0.0.1", port)
    threading.Thread(target=following.serve_forever, daemon=True).start()
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 404
    following.shutdown()


def app_like(tmp_path, name: str, program: str) -> ManagedProcess:
    """A process that says a few things, with a blank line and a progress bar among them, then does
    `program`; ready once it has written its `ready` file."""
    ready = tmp_path / f"{name}.ready"
    script = ("import sys, time, pathlib\n"
              "print('loading the task', flush=True)\n"
              "print('\\r 10%|#  |\\r100%|###|', flush=True)\n"
              "print(flush=True)\n"
              f"pathlib.Path({str(ready)!r}).touch()\n" + program)
    return ManagedProcess(name, [sys.executable, "-c", script], is_ready=ready.exists,
                          log_path=tmp_path / f"{name}.log")


def test_a_process_killed_by_the_system_is_named_with_the_oom_hint_and_its_log(tmp_path):
    process = app_like(tmp_path, "client-1", "print('training round 3', flush=True)\ntime.sleep(60)\n")
    process.start()
    try:
        assert process.ended() is None
        time.sleep(0.5)
        os.kill(process.process.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer does
        assert process.ended(within=10) == (
            f"client-1 was killed by SIGKILL (killed by the system: out of memory?); the last lines of its log "
            f"({tmp_path / 'client-1.log'}):\n  loading the task\n  training round 3")
    finally:
        process.stop()
    assert process.ended() is None, "a process stopped on purpose has not 'ended'"


def test_a_process_that_exits_is_named_with_its_code_and_its_logs_last_lines(tmp_path):
    failing = app_like(tmp_path, "client-0", "sys.exit('client 0: the data file is missing')\n")
    with pytest.raises(ServiceError) as failed:
        failing.start()
    assert str(failed.value) == (
        f"client-0 exited with code 1 before it was ready; the last lines of its log ({tmp_path / 'client-0.log'}):\n"
        "  loading the task\n  client 0: the data file is missing")


def test_a_driven_client_that_died_stops_the_demo_with_how_it_ended(tmp_path):
    """--drive: a call to a client that the system killed names the client, not the connection."""
    port = free_port(0)
    server = ManagedProcess("client-0", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                            is_ready=lambda: port_listens(port), log_path=tmp_path / "client-0.log")
    server.start()
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
        with tqdm(disable=True) as bar, pytest.raises(ProcessEnded, match=r"^client-0 was killed by SIGKILL "
                                                                          r"\(killed by the system: out of memory\?\)"):
            demo.participate_all([HttpEndpoint(f"http://127.0.0.1:{port}", server)], DemoOptions(), bar)
    finally:
        server.stop()
