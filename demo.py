"""`run.py demo`: the whole system on one machine.

Full stack: Ganache, the IPFS daemon, the organization and N client processes, each a real
process, and the network runs by itself: the organization runs the rounds and every client takes
part on its own; the demo only follows the chain (and the organization's and the clients' logs)
and reports. One client is slow, past every round's deadline, and the last one joins after round 1.
--drive instead drives every round through the apps' HTTP APIs, as before the network ran itself.

Embedded (--embedded): eth-tester and the on-disk store, every role in this process, driven
through Flask's test clients, so the same API and round code run either way.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import requests
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from infra import chain, ipfs
from infra.files import REPO_ROOT, read_json_lines
from infra.plots import accuracy_png
from infra.processes import ManagedProcess, http_answers, machine_busy_seconds, port_listens
from infra.settings import EMBEDDED, Settings
from infra.webapp import LOG_FORMAT
from organization.service import history_path
from processor.tasks import get_task
from processor.privacy import PrivacyPlan
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
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)  # how every client privatizes its delta
    embedded: bool = False
    drive: bool = False  # full stack: drive every round through the apps' HTTP APIs instead of watching
    round_seconds: int = 20  # each round's deadline, from its opening (full stack, running by itself)
    straggler: bool = True  # client 1 (of 3 or more) trains past every deadline: its updates are refused
    late_joiner: bool = True  # the last client (of 2 or more) is enrolled and started once round 1 is merged
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


class ProcessEnded(DemoError):
    """One of the demo's app processes ended: the demo cannot go on without it."""


class HttpEndpoint:
    """An app served by another process, which the demo started."""

    def __init__(self, url: str, process: ManagedProcess, timeout: float = 600.0) -> None:
        self.url = url
        self.process = process
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        try:
            response = requests.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            # A process that dies drops its connections: how it ended says more than the failed call.
            ended = self.process.ended(within=5)
            if ended is not None:
                raise ProcessEnded(ended) from None
            raise DemoError(f"{method} {self.url + path}: {exc}") from None
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


# An earlier run's apps may still be stopping: how long a port in use is given to come free.
PORT_WAIT_SECONDS = 2.0


def check_port(port: int, owner: str, flag: str) -> None:
    """Fail unless an app can listen on 127.0.0.1:`port`, naming the port and the flag that moves it.
    Bound with SO_REUSEADDR, as both servers bind: a port that only an earlier run's closed
    connections hold (TIME_WAIT) is free to them, one that a process listens on is not."""
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise DemoError(f"port {port} ({owner}) is in use ({exc.strerror}): stop what listens there, "
                                    f"or choose another with {flag}") from None
        time.sleep(0.25)


def check_ports(options: DemoOptions) -> None:
    """Every app's port, before anything starts."""
    check_port(options.org_port, "the organization's", "--port")
    for k in range(options.clients):
        check_port(options.first_client_port + k, f"client {k}'s", "--client-port (client K serves on it + K)")


def first_ended(processes: Iterable[ManagedProcess]) -> str | None:
    """How the first of `processes` that ended did, with its log's last lines; None while all run."""
    return next((ended for ended in (process.ended() for process in processes) if ended is not None), None)


def dashboards(apps: Sequence[tuple[ManagedProcess, str]]) -> str:
    return ", ".join(f"{process.name} {url}" for process, url in apps)


@contextmanager
def logging_into(path: Path) -> Iterator[None]:
    """This process's log lines, INFO and up, go to `path` instead of the terminal meanwhile: the
    embedded demo's apps run here, and their lines would land between the progress bars."""
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)
        handler.close()


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


class FullStack:
    """Ganache, the IPFS daemon and a deployed registry, and the apps as separate processes."""

    def __init__(self, options: DemoOptions, settings: Settings, stack: ExitStack) -> None:
        check_ports(options)
        self.options, self.settings, self.stack = options, settings, stack
        self.run_dir = settings.state_dir / "demo"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.logs = self.run_dir / "logs"
        node = chain.local_chain(settings.chain_node, settings.chain_url, self.run_dir)
        if not http_answers(settings.chain_url, "POST"):
            log(f"starting {node.name} at {settings.chain_url}")
        stack.enter_context(node)
        if not ipfs.ipfs_answers(settings.ipfs_api):
            log(f"starting the IPFS daemon at {settings.ipfs_api}")
        stack.enter_context(ipfs.IPFSDaemon.for_api(settings.ipfs_api, repo_dir=settings.state_dir / "ipfs",
                                                       log_path=self.logs / "ipfs.log"))
        self.w3 = chain.connect(settings.chain_url)
        record = self.run_dir / "deployments.json"
        self.registry = chain.deploy_registry(self.w3, chain.DEV_KEYS[0])
        chain.record_deployment(record, self.w3, self.registry.address)
        log(f"deployed the round registry at {self.registry.address} ({'reused' if node.reused else 'new'} chain)")
        self.env = {"FL_CHAIN_URL": settings.chain_url, "FL_IPFS_API": settings.ipfs_api,
                    "FL_CONTRACT_RECORD": str(record), "FL_STATE_DIR": str(self.run_dir), "TF_CPP_MIN_LOG_LEVEL": "2",
                    **compute_threads(options.clients)}
        self.clients: dict[int, ManagedProcess] = {}
        self.org: ManagedProcess | None = None
        self.apps: list[tuple[ManagedProcess, str]] = []  # every app's process and URL

    def app_process(self, name: str, port: int, args: list[str]) -> tuple[ManagedProcess, str]:
        """An app's process, not started, ready once its port accepts connections, and its URL. It
        logs everything (--verbose) to its file, which the terminal never shows."""
        process = ManagedProcess(name, [sys.executable, str(REPO_ROOT / "run.py"), *args, "--port", str(port),
                                        "--verbose"],
                                 is_ready=lambda: port_listens(port), log_path=self.logs / f"{name}.log",
                                 env=self.env, cwd=REPO_ROOT, ready_timeout=600)
        self.stack.callback(process.stop)
        self.apps.append((process, f"http://127.0.0.1:{port}"))
        return self.apps[-1]

    def organization(self, extra: Sequence[str] = ()) -> tuple[ManagedProcess, str]:
        options = self.options
        self.org, url = self.app_process("organization", options.org_port, [
            "app", "--task", options.task, "--seed", str(options.seed), "--bounds", options.bounds,
            "--round-seconds", str(options.round_seconds), *options.training.as_flags(), *options.privacy.as_flags(),
            # a secure round merged from fewer updates than the threshold could not be unmasked
            *(["--quorum", str(options.privacy.threshold)] if options.privacy.secure_aggregation else []), *extra])
        return self.org, url

    def client(self, k: int, extra: Sequence[str] = ()) -> tuple[ManagedProcess, str]:
        options = self.options
        self.clients[k], url = self.app_process(f"client-{k}", options.first_client_port + k, [
            "client", "--id", str(k), "--clients", str(options.clients), "--task", options.task,
            "--partition", options.partition, "--alpha", str(options.alpha), "--seed", str(options.seed), *extra])
        return self.clients[k], url

    def ended(self) -> str | None:
        """How the first app process that ended did; None while all run."""
        return first_ended(process for process, _ in self.apps)

    def enrol(self, k: int) -> None:
        """Enrol client k, as the operator does with `run.py enrol`: it takes part from the next round."""
        self.registry.add_client(chain.DEV_KEYS[0], chain.client_address(k))

    def history(self) -> dict[str, Any]:
        try:
            return json.loads(history_path(self.run_dir, self.registry.address).read_text())
        except (OSError, ValueError):
            return {"initial": None, "rounds": {}}

    def activity(self, k: int) -> list[dict]:
        return read_json_lines(self.run_dir / "client" / chain.client_address(k) / "activity.jsonl")


def start_driven_stack(options: DemoOptions, settings: Settings, stack: ExitStack) -> tuple[Endpoint, list[Endpoint]]:
    """The full stack with the organization and the clients waiting to be told (--manual)."""
    system = FullStack(options, settings, stack)
    org, org_url = system.organization()
    started = [system.client(k, ["--manual"]) for k in range(options.clients)]
    log(f"starting the organization and {options.clients} clients (logs in {system.logs})")
    for process, _ in system.apps:
        process.start()
    log(f"dashboards, while the demo runs: {dashboards(system.apps)}")
    return HttpEndpoint(org_url, org), [HttpEndpoint(url, process) for process, url in started]


@dataclass
class EmbeddedSystem:
    """Every role in this process: the organization's and the clients' apps on the embedded chain
    and an on-disk store, sharing one Web3, one store and one set of settings."""
    org: Any  # the organization's Flask app
    clients: list  # a Flask app per client
    settings: Settings
    w3: Any
    store: ipfs.ContentStore


def embedded_system(state_dir: Path, org_config, client_configs: Sequence = (), registry=None,
                    chain_url: str = EMBEDDED, ipfs_api: str = EMBEDDED) -> EmbeddedSystem:
    """The organization's app (`org_config`) and a client app per ClientConfig, sharing the embedded
    chain and a store under `state_dir` (or the chain node and IPFS node at `chain_url` and
    `ipfs_api`); with `registry`, an already deployed contract."""
    import client
    import organization

    settings = Settings.from_env(state_dir=state_dir, chain_url=chain_url, ipfs_api=ipfs_api,
                                 contract_record=state_dir / "deployments.json")
    w3 = chain.connect(chain_url)
    store = ipfs.open_store(ipfs_api, state_dir)
    shared = {"SETTINGS": settings, "W3": w3, "STORE": store, **({"REGISTRY": registry} if registry else {})}
    org = organization.create_app({**shared, "ORG_CONFIG": org_config})
    clients = [client.create_app({**shared, "CLIENT_CONFIG": config}) for config in client_configs]
    return EmbeddedSystem(org, clients, settings, w3, store)


def start_embedded(options: DemoOptions, settings: Settings, stack: ExitStack) -> tuple[Endpoint, list[Endpoint]]:
    from client.service import ClientConfig
    from organization.service import OrganizationConfig
    from processor.screen import policy_for

    run_dir = settings.state_dir / "demo-embedded"
    shutil.rmtree(run_dir, ignore_errors=True)
    # The apps log here, in a file as they do in their own processes, not between the progress bars.
    log_path = run_dir / "logs" / "apps.log"
    log_path.parent.mkdir(parents=True)
    stack.enter_context(logging_into(log_path))
    registry = chain.deploy_registry(chain.connect(EMBEDDED), chain.DEV_KEYS[0])
    log(f"embedded chain and store; round registry at {registry.address}; the apps' log: {log_path}")
    system = embedded_system(
        run_dir, OrganizationConfig(task=options.task, seed=options.seed, training=options.training,
                                    merge=policy_for(options.bounds), privacy=options.privacy),
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
        except ProcessEnded:  # not one client's failure in one round: the demo stops
            raise
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
    with tqdm(total=options.training.epochs * len(clients), desc=f"round {round_id} training", unit="client-epoch",
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
        "auc": result["metrics"].get("auc"),
        "epsilon": result.get("epsilon"),
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


def print_table(rows: list[dict[str, Any]], initial_accuracy: float, baseline: dict[str, Any],
                privacy: PrivacyPlan = PrivacyPlan()) -> None:
    with_auc = baseline["auc"] is not None
    auc_header = f"{'AUC':>6}" if with_auc else ""
    epsilon_header = f"  epsilon (delta {privacy.delta:g})" if privacy.is_dp else ""
    print(f"\n{'round':>5} {'accuracy':>9}{auc_header}{' held-out':>10} {'subm.':>5} {'late':>4} {'gas':>9} "
          f"{'bytes':>10} {'seconds':>8} {'CPU-s':>6}{epsilon_header}")
    print(f"{'base':>5} {100 * baseline['accuracy']:8.2f}%" + (f"{baseline['auc']:>6.3f}" if with_auc else "")
          + f"  always answering {baseline['answer']}")
    print(f"{'init':>5} {100 * initial_accuracy:8.2f}%")
    for row in rows:
        auc = (f"{row['auc']:>6.3f}" if row.get("auc") is not None else f"{'-':>6}") if with_auc else ""
        held_out = f"{100 * row['federated']['accuracy']:8.2f}%" if row.get("federated") else f"{'-':>9}"
        seconds = f"{row['seconds']:>8.2f}" if row["seconds"] is not None else f"{'-':>8}"
        late = len(row.get("refused", []))
        print(f"{row['round']:>5} {100 * row['accuracy']:8.2f}%{auc} {held_out} {row['submissions']:>5} {late:>4} "
              f"{row['gas']:>9} {row['bytes']:>10} {seconds} {row['cpu_seconds']:>6.2f}"
              + (f"  {row['epsilon']:>20.2f}" if privacy.is_dp and row.get("epsilon") is not None else "")
              + ("  missed its quorum" if row.get("missed_quorum") else
                 "  every update refused: model unchanged" if not row["submissions"] else ""))
    print(f"(base: the trivial baseline, always answering the test set's most common label ({baseline['answer']})"
          + ("; an AUC of 0.5 is chance" if with_auc else "") + ";\n accuracy"
          + (" and AUC" if with_auc else "") + ": on the organization's test set; held-out: on the clients' own "
          "held-out data, sample-weighted, reported with the next round's updates;\n late: updates the contract "
          "refused after the deadline; CPU-s: the machine's cores' busy time during the round, all processes"
          + (f";\n epsilon: the privacy spent by the rounds so far; each client's delta is {privacy.describe()}"
             if privacy.is_dp else "") + ")")


def straggler_and_late_joiner(options: DemoOptions) -> tuple[int | None, int | None]:
    late = options.clients - 1 if options.late_joiner and options.clients >= 2 else None
    straggler = 1 if options.straggler and options.clients >= 3 else None
    return straggler, late


def run_self_running(options: DemoOptions, settings: Settings, stack: ExitStack,
                     after_round: Callable[[FullStack, dict], None] | None = None,
                     ) -> tuple[list[dict], float, str, FullStack]:
    """Start the network and follow it until the organization has merged `options.rounds` rounds;
    `after_round(system, row)` runs as each round ends (the benchmarks' faults).

    Returns the rows, the initial accuracy, the organization's dashboard URL and the system."""
    system = FullStack(options, settings, stack)
    straggler, late = straggler_and_late_joiner(options)
    for k in range(options.clients):
        if k != late:
            system.enrol(k)
    org, org_url = system.organization(["--rounds", str(options.rounds)])
    # The clients start first, so that they are listening when the organization opens round 1.
    starting = [system.client(k, ["--train-delay", str(options.round_seconds + 2)] if k == straggler else [])[0]
                for k in range(options.clients) if k != late] + [org]
    log(f"starting {len(starting) - 1} clients and the organization (logs in {system.logs}); the organization "
        f"runs {options.rounds} rounds of at most {options.round_seconds} s by itself")
    if straggler is not None:
        log(f"client {straggler} is slow: it trains {options.round_seconds + 2} s past every round's opening")
    for process in starting:
        process.start()
    log(f"dashboards, while the demo runs: {dashboards(system.apps)}")
    follower = RoundFollower(system, options)
    rows = []
    while len(rows) < options.rounds:
        row = follower.next_round()
        rows.append(row)
        note = (" (missed its quorum: restarted from the same base)" if row["missed_quorum"] else
                " (every update refused: the model is unchanged)" if not row["submissions"] else "")
        log(f"round {row['round']}: accuracy {100 * row['accuracy']:.2f}%, {row['submissions']} updates merged, "
            f"{row['seconds']:.1f} s{note}")
        if late is not None and row["round"] == 1:
            system.enrol(late)
            joining, url = system.client(late)
            log(f"client {late} joins now: enrolled during round 2, it takes part from round 3; its page: {url}")
            joining.start()
        if after_round is not None:
            after_round(system, row)
    history = system.history()
    submitted_gas = follower.submission_gas()
    for row in rows:  # the clients' evaluation of a model comes with the next round's updates, and a
        row["gas"] += submitted_gas.get(row["round"], 0)
        row["federated"] = history["rounds"].get(str(row["round"]), {}).get("federated")  # straggler's refusal late
        row["refused"] = follower.refusals([row["round"]])
    return rows, history["initial"]["accuracy"], org_url, system


class RoundFollower:
    """Follows the rounds from the chain's events and the organization's record, with a progress bar."""

    # Between looks at the record, the chain and the clients' logs: the round's end is timed by the
    # organization's clock, so looking more often would only take CPU from the clients' training.
    LOOK_SECONDS = 0.5

    def __init__(self, system: FullStack, options: DemoOptions) -> None:
        self.system, self.options = system, options
        self.round_id, self.busy = 1, machine_busy_seconds()
        self.timeout = 600 + 3 * options.round_seconds
        self.reported: set[tuple] = set()
        self.enrolled_from: dict[int, int] = {}  # client k: the first round it may take part in
        self.submitted: Counter = Counter()  # round: updates its logs show so far
        self.logs_from: int | None = None  # the first block whose logs are not counted yet

    def refusals(self, round_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The updates for `round_ids` the contract refused, as the clients' activity logs tell."""
        return [{"round": event["round"], "client": f"client {k}", "reason": event["reason"]}
                for k in list(self.system.clients) for event in self.system.activity(k)
                if event["round"] in round_ids and event["event"] == "refused"]

    def report_refusals(self) -> None:
        for refusal in self.refusals(range(max(1, self.round_id - 2), self.round_id + 1)):
            if (refusal["round"], refusal["client"]) not in self.reported:
                self.reported.add((refusal["round"], refusal["client"]))
                log(f"round {refusal['round']}: {refusal['client']}'s update was refused: {refusal['reason']}")

    def expected(self, round_id: int) -> int:
        """The clients started so far that round `round_id` expects (enrolled before it opened)."""
        for k in list(self.system.clients):
            if k not in self.enrolled_from:  # fixed once enrolled: asked until then
                first_round = self.system.registry.enrolled_from(chain.client_address(k))
                if first_round:
                    self.enrolled_from[k] = first_round
        return sum(first_round <= round_id for first_round in self.enrolled_from.values())

    def submissions(self, round_id: int) -> int:
        """Updates submitted to `round_id` so far, counted from the chain's logs since the last look (a
        query of the logs costs the node a tenth of a call to a view)."""
        if self.logs_from is None:
            self.logs_from = self.system.registry.deployment_block
        latest = self.system.w3.eth.block_number
        for event in self.system.registry.events("UpdateSubmitted", self.logs_from, latest):
            self.submitted[event["args"]["round"]] += 1
        self.logs_from = latest + 1
        return self.submitted[round_id]

    def submission_gas(self) -> dict[int, int]:
        """Gas of the accepted submissions per round, from their receipts: read once the rounds are
        over, so that reading them takes nothing from the rounds."""
        registry, gas = self.system.registry, Counter()
        for event in registry.events("UpdateSubmitted"):
            gas[event["args"]["round"]] += self.system.w3.eth.get_transaction_receipt(event["tx_hash"])["gasUsed"]
        return gas

    def next_round(self) -> dict[str, Any]:
        system, round_id = self.system, self.round_id
        started = time.monotonic()
        with tqdm(total=self.expected(round_id), desc=f"round {round_id} updates", unit="update", file=sys.stderr,
                  leave=False, mininterval=1.0) as bar:
            while True:
                self.report_refusals()
                history = system.history()
                entry = history["rounds"].get(str(round_id))
                if entry is not None and ("opened_next_at" in entry):
                    break
                ended = system.ended()
                if ended is not None:
                    raise ProcessEnded(ended)
                if time.monotonic() - started > self.timeout:
                    raise DemoError(f"round {round_id} did not end within {self.timeout} s; see {system.logs}")
                bar.n = self.submissions(round_id)
                bar.refresh()
                time.sleep(self.LOOK_SECONDS)
        busy, self.busy = self.busy, machine_busy_seconds()
        previous = history["rounds"].get(str(round_id - 1)) if round_id > 1 else None
        opened = previous["opened_next_at"] if previous else history.get("first_opened_at")
        refused = self.refusals([round_id])
        self.round_id += 1
        return {"round": round_id, "accuracy": entry["metrics"]["accuracy"], "auc": entry["metrics"].get("auc"),
                "epsilon": entry.get("epsilon"),
                "submissions": entry.get("accepted", 0), "refused": refused,
                "missed_quorum": entry.get("missed_quorum", False),
                "gas": entry.get("finalize_gas", 0), "bytes": entry.get("model_bytes", 0),  # + submissions' at the end
                "seconds": round(entry["opened_next_at"] - opened, 2) if opened else None,
                "cpu_seconds": round(self.busy - busy, 2)}


def run_demo(options: DemoOptions, settings: Settings) -> dict[str, Any]:
    with ExitStack() as stack:
        if options.embedded:
            org, clients = start_embedded(options, settings, stack)
            rows, initial_accuracy = drive_rounds(org, clients, options)
            apps = []
        else:
            stack.enter_context(logging_redirect_tqdm())  # this process's own log lines, above the bars
            if options.drive:
                org, clients = start_driven_stack(options, settings, stack)
                rows, initial_accuracy = drive_rounds(org, clients, options)
                apps = [(endpoint.process, endpoint.url) for endpoint in (org, *clients)]
            else:
                rows, initial_accuracy, _, system = run_self_running(options, settings, stack)
                apps = system.apps
        baseline = get_task(options.task).baseline()
        print_table(rows, initial_accuracy, baseline, options.privacy)
        points = [(0, initial_accuracy)] + [(row["round"], row["accuracy"]) for row in rows]
        accuracy_png({"test accuracy": points}, title=f"{options.task}, {options.clients} clients",
                     path=options.plot_path, baseline=(f"always {baseline['answer']}", baseline["accuracy"]))
        print(f"\nplot: {options.plot_path}")
        report = {"task": options.task, "clients": options.clients, "initial_accuracy": initial_accuracy,
                  "baseline": baseline, "privacy": asdict(options.privacy), "rounds": rows}
        if options.json_path:
            options.json_path.parent.mkdir(parents=True, exist_ok=True)
            options.json_path.write_text(json.dumps(report, indent=1))
            print(f"json: {options.json_path}")
        if options.keep and apps:
            print(f"\ndashboards: {dashboards(apps)}")
            print("Ctrl-C stops everything.")
            keep_until_interrupted([process for process, _ in apps])
        return report


def keep_until_interrupted(processes: Sequence[ManagedProcess]) -> None:
    """Leave the apps up until Ctrl-C; one that ends meanwhile ends the demo, saying how it ended."""
    try:
        while (ended := first_ended(processes)) is None:
            time.sleep(1)
    except KeyboardInterrupt:
        return
    raise ProcessEnded(ended)


def drive_rounds(org: Endpoint, clients: list[Endpoint], options: DemoOptions) -> tuple[list[dict], float]:
    """Enrol every client, open round 1 and drive each round through the apps' APIs."""
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
    return rows, initial_accuracy
