"""The command line: wrong choices fail at once (before TensorFlow loads), each command takes only
the flags it uses, help shows defaults and an example, expected failures are one line, and the apps
serve with waitress and say only that unless asked for more."""
from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
import requests
from flask import Flask

import run
from demo import free_port
from infra.files import REPO_ROOT
from infra.webapp import serve

PYTHON_RUN = [sys.executable, str(REPO_ROOT / "run.py")]
# The command line in a fresh interpreter: its exit code, and whether TensorFlow got loaded.
PARSE_ONLY = ("import sys, run\n"
              "try:\n    run.main(sys.argv[1:])\n"
              "except SystemExit as exc:\n    print(exc.code, 'tensorflow' in sys.modules)\n")


@pytest.mark.parametrize("argv, complaint", [
    (["client", "--id", "0", "--task", "nope"], "argument --task: 'nope' is none of the tasks mnist, digits, interest"),
    (["client", "--id", "0", "--partition", "random"], "argument --partition: invalid choice: 'random'"),
    (["app", "--aggregation", "mean"], "argument --aggregation: invalid choice: 'mean'"),
    (["demo", "--update-dtype", "int8"], "argument --update-dtype: invalid choice: 'int8'"),
    (["chain", "--ipfs-api", "http://127.0.0.1:5001"], "unrecognized arguments: --ipfs-api"),
    (["ipfs", "--chain-url", "http://127.0.0.1:8545"], "unrecognized arguments: --chain-url"),
    (["compile", "--state-dir", "x"], "unrecognized arguments: --state-dir"),
    (["chain", "--node", "hardhat"], "argument --node: invalid choice: 'hardhat'"),
    (["app", "--node", "anvil"], "unrecognized arguments: --node"),
    (["app", "--noise-multiplier", "1"], "adds noise (noise_multiplier > 0) without a clip norm"),
    (["demo", "--private", "--dp-delta", "2"], "delta must lie in (0, 1)"),
    (["app", "--secure-aggregation", "--threshold", "2"], "secure aggregation needs a clip norm"),
    (["app", "--secure-aggregation", "--threshold", "2", "--dp-clip-norm", "1"], "give --rounds"),
    (["app", "--secure-aggregation", "--threshold", "3", "--dp-clip-norm", "1", "--rounds", "3", "--quorum", "2"],
     "--quorum 2 is below the secure aggregation threshold 3"),
    (["app", "--secure-aggregation", "--threshold", "2", "--dp-clip-norm", "1", "--rounds", "3", "--quorum", "2",
      "--open-enrolment"], "secure aggregation needs the allowlist"),
    (["demo", "--private", "--drive"], "secure aggregation runs on the self-running network"),
    (["demo", "--private", "--clients", "1"], "--clients 1 is fewer than the secure aggregation threshold 2"),
    (["demo", "--private", "--regularizer", "fedcurv"], "FedCurv cannot run in a private round"),
    (["app", "--noise-multiplier", "1", "--dp-clip-norm", "1", "--regularizer", "fedcurv"],
     "FedCurv cannot run in a private round"),
])
def test_a_wrong_flag_fails_before_tensorflow_loads(argv, complaint):
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False"]
    assert complaint in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["app", "client", "clients", "deploy", "enrol", "chain", "ipfs", "demo", "task"])
def test_each_commands_help_shows_defaults_and_an_example(command):
    done = subprocess.run([*PYTHON_RUN, command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "example:\n  python run.py " + command in done.stdout
    if command in ("app", "client", "clients", "demo"):  # the others' flags: URLs, paths, switches, no default
        assert "(default: " in done.stdout


@pytest.mark.parametrize("debug, reason", [(False, " (Address already in use)"), (True, "")])
def test_a_port_in_use_is_said_without_a_traceback_naming_the_flag(capsys, debug, reason):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            serve(Flask(__name__), "127.0.0.1", port, debug=debug)
    assert str(stopped.value) == f"cannot serve on 127.0.0.1:{port}{reason}: choose another with --host or --port"
    if debug:  # Werkzeug says why itself, on stderr
        assert f"Port {port} is in use" in capsys.readouterr().err


@contextmanager
def organization_app(tmp_path, *flags: str):
    """`run.py app` on the embedded chain and store, serving; yields its URL and a list that holds,
    once it has stopped (SIGTERM), everything it printed."""
    port, output_path, printed = free_port(0), tmp_path / "output.txt", []
    url = f"http://127.0.0.1:{port}"
    with output_path.open("wb") as output:
        process = subprocess.Popen([*PYTHON_RUN, "app", "--task", "digits", "--chain-url", "embedded", "--ipfs-api",
                                    "embedded", "--state-dir", str(tmp_path), "--port", str(port), *flags],
                                   cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not port_answers(url):
            assert process.poll() is None and time.monotonic() < deadline, output_path.read_text()
            time.sleep(0.25)
        yield url, printed
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, output_path.read_text()
    printed.extend(output_path.read_text().splitlines())


def port_answers(url: str) -> bool:
    try:
        return requests.get(url + "/api/status", timeout=5).ok
    except requests.ConnectionError:
        return False


def test_an_app_serves_with_waitress_and_prints_only_where_it_serves(tmp_path):
    with organization_app(tmp_path) as (url, printed):
        assert requests.get(url + "/api/status", timeout=30).headers["Server"] == "waitress"
        assert requests.post(url + "/api/deploy", timeout=60).status_code == 201  # logs an INFO line
    # no TensorFlow start-up notes (absl's, oneDNN's), no INFO lines, no development-server warning
    assert printed == [f" * Running on {url} (waitress); Ctrl-C stops it"]


def test_debug_serves_with_werkzeug_and_verbose_logs_info_lines(tmp_path):
    with organization_app(tmp_path, "--debug", "--verbose") as (url, printed):
        assert requests.get(url + "/api/status", timeout=30).headers["Server"].startswith("Werkzeug/")
        assert requests.post(url + "/api/deploy", timeout=60).status_code == 201
    assert f" * Running on {url} (Werkzeug's development server, for debugging only); Ctrl-C stops it" in printed
    assert any(re.search(r" organization INFO deployed the round registry at 0x", line) for line in printed), printed
    assert not [line for line in printed if "absl" in line or "oneDNN" in line]  # held back either way


@pytest.mark.ganache
def test_run_chain_leaves_a_running_chain_alone_and_returns(ganache_url, tmp_path, capsys):
    run.main(["chain", "--chain-url", ganache_url, "--state-dir", str(tmp_path)])
    assert capsys.readouterr().out == f"a chain is already running at {ganache_url}; nothing started\n"


def test_a_service_that_is_down_is_said_in_one_line_and_the_traceback_logged(tmp_path):
    done = subprocess.run([*PYTHON_RUN, "deploy", "--chain-url", "http://127.0.0.1:9", "--state-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    log_path = tmp_path / "logs" / "run.log"
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "run.py deploy: no Ethereum JSON-RPC node answers at http://127.0.0.1:9 (start one with `python run.py "
        f"chain`) (details in {log_path})")
    assert "Traceback" in log_path.read_text() and "ChainUnavailable" in log_path.read_text()


@pytest.mark.ganache
@pytest.mark.ipfs_daemon
def test_a_client_of_another_task_than_the_networks_stops_in_one_line(ganache_url, ipfs_api, tmp_path):
    """A network whose round 1 learns digits: a client started for mnist stops at once, naming the task."""
    from infra import chain, ipfs
    from processor import codec, rounds
    from processor.tasks import get_task
    from processor.training import TrainingSettings

    w3 = chain.connect(ganache_url)
    registry = chain.deploy_registry(w3, chain.DEV_KEYS[0])
    record = tmp_path / "deployments.json"
    chain.record_deployment(record, w3, registry.address)
    digits = get_task("digits")
    base = rounds.make_base(digits, rounds.initial_model(digits))
    model = codec.encode_model(digits, base.weights, base.fisher, round_id=1, plan=TrainingSettings())
    registry.start_round(chain.DEV_KEYS[0], ipfs.open_store(ipfs_api, tmp_path).add(model))
    done = subprocess.run([*PYTHON_RUN, "client", "--id", "0", "--task", "mnist", "--chain-url", ganache_url,
                           "--ipfs-api", ipfs_api, "--contract-record", str(record), "--state-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "client 0: the organization's rounds learn the task 'digits' (base model ")
    assert done.stderr.strip().endswith("but this client was started for 'mnist': start it with --task digits")


@pytest.mark.ganache
@pytest.mark.ipfs_daemon
def test_run_clients_takes_part_from_each_devices_own_account_once_enrolled_and_funded(ganache_url, ipfs_api,
                                                                                       tmp_path):
    """Three devices in one `run.py clients` process, two of them beyond Ganache's accounts: `run.py
    enrol --clients-of` funds and enrols them, and each submits once to the open round."""
    from infra import chain, ipfs
    from processor import codec, rounds
    from processor.tasks import get_task
    from processor.training import TrainingSettings

    w3 = chain.connect(ganache_url)
    registry = chain.deploy_registry(w3, chain.DEV_KEYS[0])
    record = tmp_path / "deployments.json"
    chain.record_deployment(record, w3, registry.address)
    services = ["--chain-url", ganache_url, "--contract-record", str(record), "--state-dir", str(tmp_path)]
    enrolled = subprocess.run([*PYTHON_RUN, "enrol", "--clients-of", "3", "--first-id", "18", *services],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    addresses = [chain.client_address(k) for k in (18, 19, 20)]
    assert enrolled.returncode == 0, enrolled.stderr
    assert all(registry.is_client(address) for address in addresses)
    assert all(w3.eth.get_balance(address) >= chain.CLIENT_MIN_WEI for address in addresses)
    digits = get_task("digits")
    base = rounds.make_base(digits, rounds.initial_model(digits))
    model = codec.encode_model(digits, base.weights, base.fisher, round_id=1, plan=TrainingSettings())
    registry.start_round(chain.DEV_KEYS[0], ipfs.open_store(ipfs_api, tmp_path).add(model))
    port = free_port(0)
    with (tmp_path / "clients.log").open("wb") as output:
        process = subprocess.Popen([*PYTHON_RUN, "clients", "--count", "3", "--first-id", "18", "--clients", "21",
                                    "--task", "digits", "--ipfs-api", ipfs_api, "--port", str(port), *services],
                                   cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while registry.round(1).submissions < 3:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "clients.log").read_text()
            time.sleep(0.5)
        time.sleep(2)  # a second submission would come now
        devices = requests.get(f"http://127.0.0.1:{port}/api/status", timeout=30).json()["devices"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (tmp_path / "clients.log").read_text()
    assert sorted(submission.client for submission in registry.submissions(1)) == sorted(addresses)
    assert [(device["address"], device["state"]) for device in devices] == [
        (address, "submitted to round 1; waiting for the next round") for address in addresses]
    assert (tmp_path / "clients.log").read_text().splitlines() == [
        f" * Running on http://127.0.0.1:{port} (waitress); Ctrl-C stops it"]


def test_an_unset_training_flag_takes_the_tasks_plan():
    """The interest task's recommender trains by its own measured plan unless a flag says otherwise."""
    from processor.training import TrainingSettings

    def plan_of(argv: list[str]) -> TrainingSettings:
        parser = argparse.ArgumentParser()
        parser.add_argument("--task")
        TrainingSettings.add_flags(parser, plans=run.TASK_PLANS)
        return run.plan_from(parser.parse_args(argv))

    interest = TrainingSettings(epochs=3, batch_size=64, learning_rate=1.0, regularizer="fedprox", ewc_lambda=0.01)
    assert plan_of(["--task", "interest"]) == interest
    assert plan_of(["--task", "mnist"]) == TrainingSettings()
    assert plan_of(["--task", "interest", "--epochs", "1"]) == replace(interest, epochs=1)
    assert plan_of(["--task", "mnist", "--regularizer", "fedprox"]) == TrainingSettings(regularizer="fedprox")


def test_run_task_drafts_a_spec_from_a_csv_and_checks_data_files_against_it(tmp_path):
    data = tmp_path / "device.csv"
    data.write_text("age,country,spend,opened\n30,de,12.5,yes\n45,fr,3.0,no\n22,de,40.1,yes\n61,it,0.0,no\n")
    spec = tmp_path / "offer.json"
    drafted = subprocess.run([*PYTHON_RUN, "task", "init", str(data), "--label", "opened", "--name", "offer",
                              "--output", str(spec)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert drafted.returncode == 0, drafted.stderr
    assert "binary label 'opened' from age (numeric), country (categorical), spend (numeric)" in drafted.stdout
    document = json.loads(spec.read_text())
    assert document["features"][1] == {"kind": "categorical", "name": "country", "vocabulary": ["de", "fr", "it"]}
    assert document["features"][0] == {"kind": "numeric", "name": "age"}  # unbounded: other devices' ages vary
    other = tmp_path / "other.csv"
    other.write_text("age,country,spend,opened\n30,es,1,yes\n")
    checked = subprocess.run([*PYTHON_RUN, "task", "check", str(spec), str(data), str(other)], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1 and f"{data}: 4 rows fit the spec" in checked.stdout
    assert checked.stderr.strip().endswith(f"{other}, row 2, column country: 'es' is not one of de, fr, it")
    assert "Traceback" not in checked.stderr  # a hostile spec's refusals: tests/test_task_spec.py
