"""`run.py demo`: the whole system on one machine, driven round by round through the apps' HTTP APIs.

Full stack: Ganache, the IPFS daemon, the organization and N client processes, each a real
process. Embedded (--embedded): eth-tester and the on-disk store, every role in this process,
driven through Flask's test clients, so the same API and round code run either way.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import requests
from tqdm import tqdm

from infra import chain, ipfs
from infra.files import REPO_ROOT
from infra.plots import accuracy_png
from infra.processes import ManagedProcess, http_answers, machine_busy_seconds
from infra.settings import EMBEDDED, Settings
from processor.training import TrainingSettings


@dataclass(frozen=True)
class DemoOptions:
    task: str = "mnist"
    clients: int = 3
    rounds: int = 5
    partition: str = "iid"
    training: TrainingSettings = field(default_factory=TrainingSettings)
    alpha: float = 0.5  # Dirichlet concentration
    seed: int = 0  # initial model, partitions and batch order
    bounds: str = "median"  # how the organization bounds one client's influence (processor.screen.BOUNDS)
    embedded: bool = False
    keep: bool = False
    json_path: Path | None = None
    plot_path: Path = REPO_ROOT / "results" / "demo_accuracy.png"
    org_port: int = 5000
    first_client_port: int = 5100


class Endpoint(Protocol):
    url: str

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]: ...


class DemoError(RuntimeError):
    pass


class HttpEndpoint:
    """An app served by another process."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        response = requests.request(method, self.url + path, json=body, timeout=self.timeout)
        return check_answer(method, self.url + path, response.status_code, response.json())


class InProcessEndpoint:
    """An app in this process, reached through Flask's test client (the embedded demo)."""

    def __init__(self, app, name: str) -> None:
        self.client = app.test_client()
        self.url = f"in-process:{name}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        response = self.client.open(path, method=method, json=body)
        return check_answer(method, self.url + path, response.status_code, response.get_json())


def check_answer(method: str, url: str, status: int, payload: Any) -> dict[str, Any]:
    if status >= 400:
        message = payload.get("error") if isinstance(payload, dict) else payload
        raise DemoError(f"{method} {url} answered {status}: {message}")
    return payload


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise DemoError("no free port")


def compute_threads(processes: int) -> dict[str, str]:
    """Thread pools (TensorFlow's and NumPy's OpenBLAS) for one of `processes` training processes
    sharing this machine: by default each would size its pools to every core, and they would
    preempt one another. OpenBLAS's idle workers also spin for a while after every threaded call:
    0.1-0.15 CPU-seconds per full-stack round (benchmarks/README.md)."""
    threads = str(max(1, (os.cpu_count() or 1) // max(processes, 1)))
    return {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# ---- bringing the system up ---------------------------------------------------------------


def start_full_stack(options: DemoOptions, settings: Settings, stack: ExitStack) -> tuple[Endpoint, list[Endpoint]]:
    run_dir = settings.state_dir / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    logs = run_dir / "logs"

    if not http_answers(settings.chain_url, "POST"):
        log(f"starting Ganache at {settings.chain_url}")
    ganache = stack.enter_context(chain.Ganache(settings.chain_url, db_dir=run_dir / "chain",
                                                log_path=logs / "ganache.log"))
    if not ipfs.ipfs_answers(settings.ipfs_api):
        log(f"starting the IPFS daemon at {settings.ipfs_api}")
    stack.enter_context(ipfs.IPFSDaemon.for_api(settings.ipfs_api, repo_dir=settings.state_dir / "ipfs",
                                                   log_path=logs / "ipfs.log"))
    w3 = chain.connect(settings.chain_url)
    record = run_dir / "deployments.json"
    registry = chain.deploy_registry(w3, chain.DEV_KEYS[0])
    chain.record_deployment(record, w3, registry.address)
    log(f"deployed the round registry at {registry.address} ({'reused' if ganache.reused else 'new'} chain)")

    env = {"FL_CHAIN_URL": settings.chain_url, "FL_IPFS_API": settings.ipfs_api,
           "FL_CONTRACT_RECORD": str(record), "FL_STATE_DIR": str(run_dir), "TF_CPP_MIN_LOG_LEVEL": "2",
           **compute_threads(options.clients)}
    run_py = str(REPO_ROOT / "run.py")

    def app_process(name: str, port: int, args: list[str]) -> tuple[ManagedProcess, Endpoint]:
        url = f"http://127.0.0.1:{port}"
        process = ManagedProcess(name, [sys.executable, run_py, *args, "--port", str(port)],
                                 is_ready=lambda: http_answers(url + "/api/status"),
                                 log_path=logs / f"{name}.log", env=env, cwd=REPO_ROOT, ready_timeout=600)
        stack.callback(process.stop)
        return process, HttpEndpoint(url)

    starting = [app_process("organization", free_port(options.org_port),
                            ["app", "--task", options.task, "--seed", str(options.seed), "--bounds", options.bounds,
                             *options.training.as_flags()])]
    for k in range(options.clients):
        starting.append(app_process(
            f"client-{k}", free_port(options.first_client_port + k),
            ["client", "--id", str(k), "--clients", str(options.clients), "--task", options.task,
             "--partition", options.partition, "--alpha", str(options.alpha), "--seed", str(options.seed)]))
    log(f"starting the organization and {options.clients} clients (logs in {logs})")
    for process, _ in starting:
        process.start()
    endpoints = [endpoint for _, endpoint in starting]
    return endpoints[0], endpoints[1:]


@dataclass
class EmbeddedSystem:
    """Every role in this process: the organization's and the clients' apps on the embedded chain
    and an on-disk store, sharing one Web3, one store and one set of settings."""
    org: Any  # the organization's Flask app
    clients: list  # a Flask app per client
    settings: Settings
    w3: Any
    store: ipfs.ContentStore


def embedded_system(state_dir: Path, org_config, client_configs: Sequence = (), registry=None) -> EmbeddedSystem:
    """The organization's app (`org_config`) and a client app per ClientConfig, sharing the embedded
    chain and a store under `state_dir`; with `registry`, an already deployed contract."""
    import client
    import organization

    settings = Settings.from_env(state_dir=state_dir, chain_url=EMBEDDED, ipfs_api=EMBEDDED,
                                 contract_record=state_dir / "deployments.json")
    w3 = chain.connect(EMBEDDED)
    store = ipfs.open_store(EMBEDDED, state_dir)
    shared = {"SETTINGS": settings, "W3": w3, "STORE": store, **({"REGISTRY": registry} if registry else {})}
    org = organization.create_app({**shared, "ORG_CONFIG": org_config})
    clients = [client.create_app({**shared, "CLIENT_CONFIG": config}) for config in client_configs]
    return EmbeddedSystem(org, clients, settings, w3, store)


def start_embedded(options: DemoOptions, settings: Settings) -> tuple[Endpoint, list[Endpoint]]:
    from client.service import ClientConfig
    from organization.service import OrganizationConfig
    from processor.screen import policy_for

    run_dir = settings.state_dir / "demo-embedded"
    shutil.rmtree(run_dir, ignore_errors=True)
    registry = chain.deploy_registry(chain.connect(EMBEDDED), chain.DEV_KEYS[0])
    log(f"embedded chain and store; round registry at {registry.address}")
    system = embedded_system(
        run_dir, OrganizationConfig(task=options.task, seed=options.seed, training=options.training,
                                    merge=policy_for(options.bounds)),
        [ClientConfig(client_id=k, num_clients=options.clients, task=options.task, partition=options.partition,
                      alpha=options.alpha, seed=options.seed)
         for k in range(options.clients)],
        registry=registry)
    return (InProcessEndpoint(system.org, "organization"),
            [InProcessEndpoint(app, f"client-{k}") for k, app in enumerate(system.clients)])


# ---- driving the rounds -------------------------------------------------------------------


def epochs_done(endpoint: Endpoint) -> int:
    """The epochs a client's running job has finished (0 if it cannot say: progress only)."""
    try:
        return endpoint.call("GET", "/api/job")["progress"].get("epoch", 0)
    except (DemoError, requests.RequestException):
        return 0


def participate_all(clients: list[Endpoint], options: DemoOptions, bar: tqdm) -> list[tuple[dict | None, str | None]]:
    """Every client pulls, trains and publishes; (result, error) per client.

    Full stack: all at once, each call waiting for its client's job, so the round goes on the
    moment the slowest client is done; meanwhile the bar follows their epochs. Embedded: the
    clients take turns in this process."""
    def participate(endpoint: Endpoint) -> tuple[dict | None, str | None]:
        try:
            return endpoint.call("POST", "/api/participate", {"wait": True})["result"], None
        except DemoError as exc:
            return None, str(exc)

    if options.embedded:
        outcomes = []
        for endpoint in clients:
            outcomes.append(participate(endpoint))
            bar.update(options.training.epochs)
        return outcomes
    with ThreadPoolExecutor(len(clients)) as pool:
        calls = [pool.submit(participate, endpoint) for endpoint in clients]
        while wait(calls, timeout=0.5).not_done:
            bar.n = sum(options.training.epochs if call.done() else epochs_done(endpoint)
                        for endpoint, call in zip(clients, calls))
            bar.refresh()
        return [call.result() for call in calls]


def run_round(round_id: int, org: Endpoint, clients: list[Endpoint], options: DemoOptions) -> dict[str, Any]:
    started, busy = time.perf_counter(), machine_busy_seconds()
    with tqdm(total=options.training.epochs * len(clients), desc=f"round {round_id} training", unit="epoch",
              file=sys.stderr, leave=False) as bar:
        outcomes = participate_all(clients, options, bar)
    published = [result for result, _ in outcomes if result is not None]
    for endpoint, (_, error) in zip(clients, outcomes):
        if error is not None:
            log(f"round {round_id}: a client failed: {endpoint.url}: {error}")
    result = org.call("POST", f"/api/rounds/{round_id}/aggregate")
    seconds, cpu_seconds = time.perf_counter() - started, machine_busy_seconds() - busy
    client_phases = [r["seconds"] for r in published]
    return {
        "round": round_id,
        "accuracy": result["metrics"]["accuracy"],
        "submissions": result["accepted"],
        "gas": sum(r["gas"] for r in published) + result["finalize_gas"],
        "bytes": sum(r["bytes"] for r in published) + result["model_bytes"],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # every process on the machine: its cores' busy time
        "phases": {
            "client": {phase: round(sum(p.get(phase, 0.0) for p in client_phases) / max(len(client_phases), 1), 3)
                       for phase in sorted({phase for p in client_phases for phase in p})},
            "organization": result["seconds"],
        },
    }


def print_table(rows: list[dict[str, Any]], initial_accuracy: float) -> None:
    print(f"\n{'round':>5} {'accuracy':>9} {'subm.':>5} {'gas':>9} {'bytes':>10} {'seconds':>8} {'CPU-s':>6}")
    print(f"{'init':>5} {100 * initial_accuracy:8.2f}%")
    for row in rows:
        print(f"{row['round']:>5} {100 * row['accuracy']:8.2f}% {row['submissions']:>5} {row['gas']:>9} "
              f"{row['bytes']:>10} {row['seconds']:>8.2f} {row['cpu_seconds']:>6.2f}")
    print("(CPU-s: the machine's cores' busy time during the round, all processes)")
    print("\nwall time per phase (client phases: mean over clients, which train in parallel):")
    for row in rows:
        client = ", ".join(f"{k} {v:.2f}s" for k, v in row["phases"]["client"].items())
        org = ", ".join(f"{k} {v:.2f}s" for k, v in row["phases"]["organization"].items())
        print(f"  round {row['round']}: clients [{client}]; organization [{org}]")


def run_demo(options: DemoOptions, settings: Settings) -> dict[str, Any]:
    with ExitStack() as stack:
        if options.embedded:
            org, clients = start_embedded(options, settings)
        else:
            org, clients = start_full_stack(options, settings, stack)
        for endpoint in clients:
            address = endpoint.call("GET", "/api/status")["address"]
            org.call("POST", "/api/clients", {"address": address})
        first = org.call("POST", "/api/rounds")
        initial_accuracy = first["metrics"]["accuracy"]
        log(f"round 1 opened; initial model test accuracy {100 * initial_accuracy:.2f}%")
        rows = []
        for round_id in tqdm(range(1, options.rounds + 1), desc="rounds", unit="round", file=sys.stderr):
            row = run_round(round_id, org, clients, options)
            rows.append(row)
            log(f"round {round_id}: accuracy {100 * row['accuracy']:.2f}%, {row['submissions']} updates, "
                f"{row['seconds']:.1f} s")
        print_table(rows, initial_accuracy)
        points = [(0, initial_accuracy)] + [(row["round"], row["accuracy"]) for row in rows]
        accuracy_png({"test accuracy": points}, title=f"{options.task}, {options.clients} clients",
                     path=options.plot_path)
        print(f"\nplot: {options.plot_path}")
        report = {"task": options.task, "clients": options.clients, "initial_accuracy": initial_accuracy,
                  "rounds": rows}
        if options.json_path:
            options.json_path.parent.mkdir(parents=True, exist_ok=True)
            options.json_path.write_text(json.dumps(report, indent=1))
            print(f"json: {options.json_path}")
        if options.keep and not options.embedded:
            print(f"\ndashboards: organization {org.url}; clients " + ", ".join(c.url for c in clients))
            print("Ctrl-C stops everything.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return report
