"""Flower and this system side by side on the same work: accuracy and wall time per round.

    python -m benchmarks.vs_flower [--json] [--rounds 10] [--lam 3000] [--plot results/vs_flower.png]
    python -m benchmarks.vs_flower --json --only deployment    # Flower's deployment engine and ours_fedavg

Plots: accuracy per round (--plot) and, beside it, wall and CPU-seconds per round (*_cost.png).

The work: task mnist, the Keras model of processor.tasks with initial weights from --seed,
dirichlet(alpha 0.5) partitions over 5 clients, 1 local epoch of SGD (batch 32, lr 0.05) per
round, every client every round, test accuracy after each round. Each client trains on its
partition less the share our clients hold out for federated evaluation (processor.evaluation.holdout_split). Both sides train with
processor.rounds.local_update and the same per-round seeds (seed + 1000 * round + client), so
the only difference is the orchestration:
- flower: Flower 1.41's simulation engine (ray, 5 virtual SuperNodes, 1 CPU each) runs the
  federated loop with its FedAvg strategy; the test accuracy comes from its evaluate_fn.
- flower_deployment: the same ServerApp and ClientApp run as Flower's users deploy them: one
  `flower-superlink` (insecure, HTTP API on 9392) and one `flower-supernode` per client (runtime
  API on 9401-9405, --node-config partition-id=K), and `flwr run` of a Flower App that this script
  writes into a temporary folder (its FLWR_HOME holds the connection). Everything stays on the
  machine: telemetry, the update check and `uv sync` of the app's dependencies are switched off.
  Flower's subprocess isolation starts a fresh `flwr-clientapp` process for every message, so
  every round each client imports flwr and TensorFlow and loads its data again: the
  per-round phases (`phases_per_round`) show it. Its processes get our clients' thread settings.
- ours_fedavg / ours_ewc: the full stack (Ganache, the IPFS daemon, the organization and 5
  client processes), lambda 0 and lambda --lam, driven by demo.run_demo. Our clients publish
  their updates as float16 (the default; --update-dtype float32 for Flower's wire precision).
  The organization merges with plain FedAvg, as Flower's strategy does (`--bounds none`; by
  default it bounds each client's influence by the round's medians: benchmarks/attack_influence.py).
- ours_embedded: every role in one process (eth-tester, the on-disk store), lambda 0.
Per round seconds: ours from the clients' start to the organization's finished aggregation and
evaluation; Flower's (either engine) between successive evaluate_fn calls (training, transfer,
aggregation and evaluation). Start-up (processes, ray, SuperLink and SuperNodes, contract
deployment) is excluded on all sides. CPU-seconds per round: the busy time of all the machine's cores over the same interval (every process of
either side: clients, servers, daemons, ray), which says how close a side is to the cores' limit.

Flower must stay out of the runtime environment: its protobuf pin (<7) conflicts with ours, so
this script runs the Flower side in a child process with FLOWER_PATH (default
.venv/flwr-overlay, made by `pip install --target .venv/flwr-overlay -r
benchmarks/requirements-bench.txt`) ahead on sys.path. Progress goes to stderr; with --json
the last stdout line is {"flower", "flower_deployment", "ours_fedavg", "ours_ewc", "ours_embedded":
{"accuracy_per_round", "seconds_per_round", "cpu_seconds_per_round"}, "ratio_seconds_per_round",
"ratio_cpu_seconds_per_round", "accuracy_gap_pp" (ours_fedavg against flower, the simulation),
"vs_flower_deployment": {"ratio_seconds_per_round", "ratio_cpu_seconds_per_round", "accuracy_gap_pp"}
(ours_fedavg's median against flower_deployment's; the largest gap of any round),
"load_average_1min": {"min", "median", "max"} (sampled every 5 s during the runs)}; each run has the
keys its side made.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.measure import full_stack_run, log, record_result
from infra.files import REPO_ROOT
from infra.processes import machine_busy_seconds
from processor.training import TrainingSettings

CLIENTS, TASK, ALPHA = 5, "mnist", 0.5
RUNS = ("flower", "flower_deployment", "ours_fedavg", "ours_ewc", "ours_embedded")
FLOWER_PATH = Path(os.environ.get("FLOWER_PATH", REPO_ROOT / ".venv" / "flwr-overlay"))


# ---- the Flower side (runs in a child process with Flower importable) -----------------------


def flower_apps(rounds: int, seed: int, training: TrainingSettings, on_evaluate, trace: str | None = None):
    """Flower's ServerApp and ClientApp for the work above, for either engine. `on_evaluate(round,
    accuracy)` is called after each evaluation (round 0: the initial model). With `trace`, each fit
    appends when its process started and when the fit began and ended (epoch seconds) to that file."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    def client_fn(context: Context):
        # runs in a ray actor or a flwr-clientapp process: only plain values cross over
        from processor import rounds as steps
        from processor.evaluation import holdout_split
        from processor.tasks import get_task

        k = int(context.node_config["partition-id"])
        task = get_task(TASK)
        x, y = task.client_data(k, CLIENTS, scheme="dirichlet", seed=seed, alpha=ALPHA)
        # our clients keep a share of their samples out of training (federated evaluation,
        # client/service.py): the same share stays out here, so both sides train on the same samples
        train, _ = holdout_split(len(y), seed=seed + k)
        x, y = x[train], y[train]

        class Client(NumPyClient):
            def fit(self, parameters, config):
                base = dict(zip(task.spec, parameters))
                zeros = {n: 0.0 * w for n, w in base.items()}
                began = time.time()
                result = steps.local_update(task, base, zeros, x, y, training,
                                            seed=seed + 1000 * int(config["round"]) + k)
                if trace:
                    import psutil

                    record(trace, {"round": int(config["round"]), "client": k, "fit_began": began,
                                   "fit_ended": time.time(), "process_started": psutil.Process().create_time()})
                return [base[n] + result.delta[n] for n in task.spec], result.num_samples, {}

        return Client().to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        from processor import rounds as steps
        from processor.tasks import get_task

        task = get_task(TASK)
        names = list(task.spec)
        data = task.data()
        initial = steps.initial_model(task, seed=seed)

        def evaluate(server_round, parameters, config):
            metrics = task.evaluate(dict(zip(names, parameters)), data.x_test, data.y_test)
            on_evaluate(server_round, metrics["accuracy"])
            return metrics["loss"], {"accuracy": metrics["accuracy"]}

        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS,
                          min_available_clients=CLIENTS, evaluate_fn=evaluate,
                          on_fit_config_fn=lambda server_round: {"round": server_round},
                          initial_parameters=ndarrays_to_parameters([initial[n] for n in names]))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


class RoundClock:
    """Accuracy, wall clock and the machine's busy CPU-seconds at each evaluation."""

    def __init__(self, label: str) -> None:
        self.label, self.accuracy, self.stamps = label, [], []

    def __call__(self, server_round: int, accuracy: float) -> None:
        self.stamps.append((time.perf_counter(), machine_busy_seconds()))
        self.accuracy.append(accuracy)
        log(f"{self.label} round {server_round}: accuracy {100 * accuracy:.2f}%")

    def figures(self) -> dict:
        # the first call evaluates the initial model; each later one closes a round
        stamps = self.stamps
        return {"initial_accuracy": self.accuracy[0], "accuracy_per_round": self.accuracy[1:],
                "seconds_per_round": [round(b[0] - a[0], 2) for a, b in zip(stamps, stamps[1:])],
                "cpu_seconds_per_round": [round(b[1] - a[1], 2) for a, b in zip(stamps, stamps[1:])]}


def run_flower(rounds: int, seed: int, training: TrainingSettings) -> dict:
    import flwr
    from flwr.simulation import run_simulation

    clock = RoundClock("flower")
    server_app, client_app = flower_apps(rounds, seed, training, clock)
    log(f"flower {flwr.__version__}: simulation engine, {CLIENTS} supernodes")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    return clock.figures()


def flower_in_child(args: argparse.Namespace) -> dict:
    if not (FLOWER_PATH / "flwr").is_dir():
        sys.exit(f"Flower is not installed at {FLOWER_PATH}: "
                 f"pip install --target {FLOWER_PATH} -r benchmarks/requirements-bench.txt")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flower.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FLOWER_PATH), str(REPO_ROOT)])}
        subprocess.run([sys.executable, "-m", "benchmarks.vs_flower", "--flower-only", str(out),
                        "--rounds", str(args.rounds), "--seed", str(args.seed),
                        *TrainingSettings.from_args(args).as_flags(exclude=("ewc_lambda",))],
                       env=env, check=True, stdout=sys.stderr)
        return json.loads(out.read_text())


# ---- Flower's deployment engine (a SuperLink, a SuperNode per client, `flwr run`) ----------------

SUPERLINK_PORT, FIRST_SUPERNODE_PORT = 9392, 9401  # the SuperLink's HTTP API; supernode K's runtime API is + K
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",  # nothing leaves the machine
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # no `uv sync` of the app's dependencies
APP_MODULE = "vs_flower_app"


def record(path: str, entry: dict) -> None:
    """One JSON line appended to `path` (one write: lines from several processes never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def deployment_phases(trace: Path) -> list[dict]:
    """Per round, where the deployment's seconds went (medians over the clients): from the previous
    evaluation until a client's flwr-clientapp process started (the message's way to the SuperNode
    and the process's launch), from then until its fit began (Python, flwr, TensorFlow and the data
    loaded, the message pulled), the fit itself, and from the last fit's end to the evaluation
    (replies back, FedAvg, test evaluation)."""
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    evaluated = {e["evaluated"]: e["at"] for e in lines if "evaluated" in e}
    phases = []
    for r in sorted(evaluated)[1:]:
        fits = [e for e in lines if e.get("round") == r]
        if not fits or r - 1 not in evaluated:
            continue
        phases.append({"to_process_s": round(statistics.median(f["process_started"] for f in fits) - evaluated[r - 1], 2),
                       "process_to_fit_s": round(statistics.median(f["fit_began"] - f["process_started"] for f in fits), 2),
                       "fit_s": round(statistics.median(f["fit_ended"] - f["fit_began"] for f in fits), 3),
                       "last_fit_to_evaluated_s": round(evaluated[r] - max(f["fit_ended"] for f in fits), 2)})
    return phases


def deployment_apps(rounds: int, seed: int, out: str, **training):
    """The Flower App's ServerApp and ClientApp (imported by the app module written at run time).
    The ServerApp writes the figures to `out` after every evaluation."""
    clock = RoundClock("flower deployment")

    def on_evaluate(server_round: int, accuracy: float) -> None:
        clock(server_round, accuracy)
        record(f"{out}.trace", {"evaluated": server_round, "at": time.time()})
        Path(f"{out}.part").write_text(json.dumps(clock.figures()))
        os.replace(f"{out}.part", out)  # the benchmark never reads half a file

    return flower_apps(rounds, seed, TrainingSettings(**training), on_evaluate, trace=f"{out}.trace")


def write_flower_app(folder: Path, args: argparse.Namespace, out: Path) -> Path:
    """A Flower App (pyproject.toml and one module) that runs `deployment_apps`."""
    app = folder / "app"
    app.mkdir(parents=True)
    training = TrainingSettings.from_args(args)
    values = {"rounds": args.rounds, "seed": args.seed, "out": str(out),
              "epochs": training.epochs, "batch_size": training.batch_size, "learning_rate": training.learning_rate}
    (app / f"{APP_MODULE}.py").write_text(
        "from benchmarks.vs_flower import deployment_apps\n\n"
        f"apps = deployment_apps(**{values!r})\n"
        "server = apps[0]  # flwr checks for plain assignments of the components' names\n"
        "client = apps[1]\n")
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "vs-flower"
version = "1.0.0"
description = "benchmarks/vs_flower.py: the same work on Flower's deployment engine"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "benchmarks"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
num-server-rounds = {args.rounds}
""")
    return app


def run_flower_deployment(args: argparse.Namespace) -> dict:
    """One `flower-superlink`, `CLIENTS` `flower-supernode`s (insecure, on this machine) and `flwr
    run` of the app above; the figures come from the ServerApp's file."""
    from demo import check_port, compute_threads
    from infra.processes import ManagedProcess, port_listens

    if not (FLOWER_PATH / "flwr").is_dir():
        sys.exit(f"Flower is not installed at {FLOWER_PATH}: bash setup.sh --bench")
    bin_dir = FLOWER_PATH / "bin"
    with tempfile.TemporaryDirectory(prefix="vs-flower-deployment-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        out = folder / "figures.json"
        app = write_flower_app(folder, args, out)
        home = folder / "flwr-home"  # FLWR_HOME: the CLI's connection and the installed app
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                          f'address = "127.0.0.1:{SUPERLINK_PORT}"\ninsecure = true\n')
        env = {**FLOWER_ENV, "FLWR_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
               "PYTHONPATH": os.pathsep.join([str(FLOWER_PATH), str(REPO_ROOT)]),
               **compute_threads(CLIENTS)}  # the same thread pools as our clients'
        ports = [SUPERLINK_PORT] + [FIRST_SUPERNODE_PORT + k for k in range(CLIENTS)]
        for port in ports:
            check_port(port, "Flower's", "SUPERLINK_PORT / FIRST_SUPERNODE_PORT in benchmarks/vs_flower.py")
        python = [sys.executable]
        superlink = ManagedProcess("flower-superlink", [*python, str(bin_dir / "flower-superlink"), "--insecure",
                                                        "--port", str(SUPERLINK_PORT),
                                                        "--disable-runtime-dependency-installation"],
                                   is_ready=lambda: port_listens(SUPERLINK_PORT), log_path=folder / "superlink.log",
                                   env=env, cwd=folder, ready_timeout=120)
        stack.callback(superlink.stop)
        superlink.start()
        nodes = []
        for k in range(CLIENTS):
            port = FIRST_SUPERNODE_PORT + k
            node = ManagedProcess(f"flower-supernode-{k}", [
                *python, str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{SUPERLINK_PORT}",
                "--port", str(port), "--node-config", f"partition-id={k} num-partitions={CLIENTS}"],
                is_ready=lambda port=port: port_listens(port), log_path=folder / f"supernode-{k}.log",
                env=env, cwd=folder, ready_timeout=120)
            stack.callback(node.stop)
            nodes.append(node.start())
        log(f"flower deployment: a SuperLink on {SUPERLINK_PORT}, {CLIENTS} SuperNodes on "
            f"{FIRST_SUPERNODE_PORT}-{FIRST_SUPERNODE_PORT + CLIENTS - 1}; flwr run {app}")
        submitted = subprocess.run([*python, str(bin_dir / "flwr"), "run", str(app), "bench"], cwd=folder,
                                   env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        log(submitted.stdout.strip() + submitted.stderr.strip())
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed ({submitted.returncode})")
        deadline = time.monotonic() + 60 + 60 * args.rounds
        figures: dict = {}
        while time.monotonic() < deadline:
            ended = next((p.ended() for p in [superlink, *nodes] if p.ended() is not None), None)
            if ended:
                raise RuntimeError(ended)
            if out.exists():
                figures = json.loads(out.read_text() or "{}")
                if len(figures.get("accuracy_per_round", [])) >= args.rounds:
                    break
            time.sleep(0.5)
        else:
            logs = "\n".join(p.with_log("is still running") for p in [superlink, *nodes])
            raise RuntimeError(f"flower deployment: {len(figures.get('accuracy_per_round', []))} of "
                               f"{args.rounds} rounds before the deadline\n{logs}")
        figures["phases_per_round"] = deployment_phases(Path(f"{out}.trace"))
        return figures


# ---- our side -------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, lam: float, embedded: bool, label: str) -> dict:
    from demo import DemoOptions

    options = DemoOptions(task=TASK, clients=CLIENTS, rounds=args.rounds, partition="dirichlet", alpha=ALPHA,
                          seed=args.seed, training=TrainingSettings.from_args(args, ewc_lambda=lam), bounds="none",
                          embedded=embedded, straggler=False, late_joiner=False,  # every client every round
                          drive=True,  # rounds driven and timed by demo.run_round, as before the network ran itself
                          plot_path=Path(tempfile.gettempdir()) / f"{label}.png")
    log(f"{label}: {'embedded' if embedded else 'full stack'}, lambda {lam:g}")
    report = full_stack_run(options, label, args.chain_url, args.ipfs_api, args.state_dir)
    rows = report["rounds"]
    return {"update_dtype": options.training.update_dtype, "initial_accuracy": report["initial_accuracy"],
            "accuracy_per_round": [r["accuracy"] for r in rows],
            "seconds_per_round": [r["seconds"] for r in rows],
            "cpu_seconds_per_round": [r["cpu_seconds"] for r in rows], "phases_per_round": [r.get("phases") for r in rows]}


class LoadSampler:
    """The machine's 1-minute load average every 5 s while the runs go (other sessions share the cores)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self.done.wait(5.0):
                return

    def start(self) -> "LoadSampler":
        self.thread.start()
        return self

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {"min": min(self.samples), "median": round(statistics.median(self.samples), 2),
                "max": max(self.samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    TrainingSettings.add_flags(parser, exclude=("ewc_lambda",))  # Flower sends float32 arrays, whatever --update-dtype
    parser.add_argument("--lam", type=float, default=3000.0, help="EWC lambda of the ours_ewc run")
    parser.add_argument("--chain-url", help="default: a chain of its own on a free port (8945 if free)")
    parser.add_argument("--ipfs-api", help="default: a daemon of its own on a free port (5401 if free)")
    parser.add_argument("--state-dir", type=Path, help="default: a new temporary folder per run")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "results" / "vs_flower.png")
    parser.add_argument("--only", nargs="+", default=list(RUNS),
                        choices=[*RUNS, "deployment"], help="the runs to make; deployment: flower_deployment "
                        "and ours_fedavg (default: all)")
    parser.add_argument("--flower-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every run's context managers stop the processes they started
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    if args.flower_only:
        args.flower_only.write_text(json.dumps(run_flower(args.rounds, args.seed, TrainingSettings.from_args(args))))
        return
    args.only = [label for label in RUNS
                 if label in args.only or ("deployment" in args.only and label in ("flower_deployment", "ours_fedavg"))]
    runs = {"flower": lambda: flower_in_child(args),
            "flower_deployment": lambda: run_flower_deployment(args),
            "ours_fedavg": lambda: run_ours(args, 0.0, False, "ours_fedavg"),
            "ours_ewc": lambda: run_ours(args, args.lam, False, "ours_ewc"),
            "ours_embedded": lambda: run_ours(args, 0.0, True, "ours_embedded")}
    load = LoadSampler().start()
    report: dict = {}
    for label in args.only:
        report[label] = runs[label]()
        log(f"{label} done; load average (1 min) {os.getloadavg()[0]:.2f}")
    report["load_average_1min"] = load.stop()
    if "flower" in report and "ours_fedavg" in report:
        for figure in ("seconds_per_round", "cpu_seconds_per_round"):
            report[f"ratio_{figure}"] = round(statistics.median(report["ours_fedavg"][figure]) /
                                              statistics.median(report["flower"][figure]), 3)
        report["accuracy_gap_pp"] = round(100 * (report["ours_fedavg"]["accuracy_per_round"][-1] -
                                                 report["flower"]["accuracy_per_round"][-1]), 2)
    if "flower_deployment" in report and "ours_fedavg" in report:
        ours, theirs = report["ours_fedavg"], report["flower_deployment"]
        report["vs_flower_deployment"] = {
            "ratio_seconds_per_round": round(statistics.median(ours["seconds_per_round"]) /
                                             statistics.median(theirs["seconds_per_round"]), 3),
            "ratio_cpu_seconds_per_round": round(statistics.median(ours["cpu_seconds_per_round"]) /
                                                 statistics.median(theirs["cpu_seconds_per_round"]), 3),
            "accuracy_gap_pp": round(100 * max(abs(a - b) for a, b in zip(ours["accuracy_per_round"],
                                                                           theirs["accuracy_per_round"])), 2)}
    from infra.plots import accuracy_png, round_cost_png

    runs = {label: run for label, run in report.items() if label in RUNS}
    title = f"{TASK}, {CLIENTS} clients, dirichlet(alpha {ALPHA})"
    accuracy_png({label: list(enumerate([run["initial_accuracy"]] + run["accuracy_per_round"]))
                  for label, run in runs.items()}, title=title, path=args.plot)
    cost_plot = args.plot.with_name(f"{args.plot.stem}_cost{args.plot.suffix}")
    round_cost_png(runs, title=f"{title}: the cost of a round", path=cost_plot)
    log(f"plots: {args.plot}, {cost_plot}")
    record_result(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
