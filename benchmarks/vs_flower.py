"""Flower and this system side by side on the same work: accuracy and wall time per round.

    python -m benchmarks.vs_flower [--json] [--rounds 10] [--lam 3000] [--plot results/vs_flower.png]

Plots: accuracy per round (--plot) and, beside it, wall and CPU-seconds per round (*_cost.png).

The work: task mnist, the Keras model of processor.tasks with initial weights from --seed,
dirichlet(alpha 0.5) partitions over 5 clients, 1 local epoch of SGD (batch 32, lr 0.05) per
round, every client every round, test accuracy after each round. Both sides train with
processor.rounds.local_update and the same per-round seeds (seed + 1000 * round + client), so
the only difference is the orchestration:
- flower: Flower 1.41's simulation engine (ray, 5 virtual SuperNodes, 1 CPU each) runs the
  federated loop with its FedAvg strategy; the test accuracy comes from its evaluate_fn.
- ours_fedavg / ours_ewc: the full stack (Ganache, the IPFS daemon, the organization and 5
  client processes), lambda 0 and lambda --lam, driven by demo.run_demo. Our clients publish
  their updates as float16 (the default; --update-dtype float32 for Flower's wire precision).
  The organization merges with plain FedAvg, as Flower's strategy does (`--bounds none`; by
  default it bounds each client's influence by the round's medians: benchmarks/attack_influence.py).
- ours_embedded: every role in one process (eth-tester, the on-disk store), lambda 0.
Per round seconds: ours from the clients' start to the organization's finished aggregation and
evaluation; Flower's between successive evaluate_fn calls (training, transfer, aggregation and
evaluation). Start-up (processes, ray, contract deployment) is excluded on both sides. CPU-seconds
per round: the busy time of all the machine's cores over the same interval (every process of
either side: clients, servers, daemons, ray), which says how close a side is to the cores' limit.

Flower must stay out of the runtime environment: its protobuf pin (<7) conflicts with ours, so
this script runs the Flower side in a child process with FLOWER_PATH (default
.venv/flwr-overlay, made by `pip install --target .venv/flwr-overlay -r
benchmarks/requirements-bench.txt`) ahead on sys.path. Progress goes to stderr; with --json
the last stdout line is {"flower", "ours_fedavg", "ours_ewc", "ours_embedded": {"accuracy_per_round",
"seconds_per_round", "cpu_seconds_per_round"}, "ratio_seconds_per_round", "ratio_cpu_seconds_per_round",
"accuracy_gap_pp"}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.measure import log
from infra.files import REPO_ROOT
from infra.processes import machine_busy_seconds
from processor.training import TrainingSettings

CLIENTS, TASK, ALPHA = 5, "mnist", 0.5
FLOWER_PATH = Path(os.environ.get("FLOWER_PATH", REPO_ROOT / ".venv" / "flwr-overlay"))


# ---- the Flower side (runs in a child process with Flower importable) -----------------------


def run_flower(rounds: int, seed: int, training: TrainingSettings) -> dict:
    import flwr
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from processor import rounds as steps
    from processor.tasks import get_task

    task = get_task(TASK)
    names = list(task.spec)
    data = task.data()
    initial = steps.initial_model(task, seed=seed)
    accuracy: list[float] = []
    stamps: list[float] = []

    def client_fn(context: Context):
        # runs in a ray actor: only plain values cross over, the task is looked up there
        from processor import rounds as steps
        from processor.tasks import get_task

        k = int(context.node_config["partition-id"])
        task = get_task(TASK)
        x, y = task.client_data(k, CLIENTS, scheme="dirichlet", seed=seed, alpha=ALPHA)

        class Client(NumPyClient):
            def fit(self, parameters, config):
                base = dict(zip(task.spec, parameters))
                zeros = {n: 0.0 * w for n, w in base.items()}
                result = steps.local_update(task, base, zeros, x, y, training,
                                            seed=seed + 1000 * int(config["round"]) + k)
                return [base[n] + result.delta[n] for n in task.spec], result.num_samples, {}

        return Client().to_client()

    def evaluate(server_round, parameters, config):
        stamps.append((time.perf_counter(), machine_busy_seconds()))
        metrics = task.evaluate(dict(zip(names, parameters)), data.x_test, data.y_test)
        accuracy.append(metrics["accuracy"])
        log(f"flower round {server_round}: accuracy {100 * metrics['accuracy']:.2f}%")
        return metrics["loss"], {"accuracy": metrics["accuracy"]}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS,
                          min_available_clients=CLIENTS, evaluate_fn=evaluate,
                          on_fit_config_fn=lambda server_round: {"round": server_round},
                          initial_parameters=ndarrays_to_parameters([initial[n] for n in names]))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    log(f"flower {flwr.__version__}: simulation engine, {CLIENTS} supernodes")
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    # the first call evaluates the initial model; each later one closes a round
    return {"initial_accuracy": accuracy[0], "accuracy_per_round": accuracy[1:],
            "seconds_per_round": [round(b[0] - a[0], 2) for a, b in zip(stamps, stamps[1:])],
            "cpu_seconds_per_round": [round(b[1] - a[1], 2) for a, b in zip(stamps, stamps[1:])]}


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


# ---- our side -------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, lam: float, embedded: bool, label: str) -> dict:
    from demo import DemoOptions, run_demo
    from infra.settings import Settings

    options = DemoOptions(task=TASK, clients=CLIENTS, rounds=args.rounds, partition="dirichlet", alpha=ALPHA,
                          seed=args.seed, training=TrainingSettings.from_args(args, ewc_lambda=lam), bounds="none",
                          embedded=embedded,
                          plot_path=Path(tempfile.gettempdir()) / f"{label}.png",
                          org_port=5640, first_client_port=5650)
    settings = Settings.from_env(chain_url=args.chain_url, ipfs_api=args.ipfs_api, state_dir=args.state_dir)
    log(f"{label}: {'embedded' if embedded else 'full stack'}, lambda {lam:g}")
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the demo's table is progress here; stdout keeps the JSON line
    try:
        report = run_demo(options, settings)
    finally:
        sys.stdout = stdout
    rows = report["rounds"]
    return {"update_dtype": options.training.update_dtype, "initial_accuracy": report["initial_accuracy"],
            "accuracy_per_round": [r["accuracy"] for r in rows],
            "seconds_per_round": [r["seconds"] for r in rows],
            "cpu_seconds_per_round": [r["cpu_seconds"] for r in rows], "phases_per_round": [r["phases"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    TrainingSettings.add_flags(parser, exclude=("ewc_lambda",))  # Flower sends float32 arrays, whatever --update-dtype
    parser.add_argument("--lam", type=float, default=3000.0, help="EWC lambda of the ours_ewc run")
    parser.add_argument("--chain-url", default="http://127.0.0.1:8945")
    parser.add_argument("--ipfs-api", default="http://127.0.0.1:5401")
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.gettempdir()) / "fl-vs-flower")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "results" / "vs_flower.png")
    parser.add_argument("--only", nargs="+", choices=["flower", "ours_fedavg", "ours_ewc", "ours_embedded"],
                        default=["flower", "ours_fedavg", "ours_ewc", "ours_embedded"])
    parser.add_argument("--flower-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()

    if args.flower_only:
        args.flower_only.write_text(json.dumps(run_flower(args.rounds, args.seed, TrainingSettings.from_args(args))))
        return
    runs = {"flower": lambda: flower_in_child(args),
            "ours_fedavg": lambda: run_ours(args, 0.0, False, "ours_fedavg"),
            "ours_ewc": lambda: run_ours(args, args.lam, False, "ours_ewc"),
            "ours_embedded": lambda: run_ours(args, 0.0, True, "ours_embedded")}
    report: dict = {label: runs[label]() for label in args.only}
    if "flower" in report and "ours_fedavg" in report:
        for figure in ("seconds_per_round", "cpu_seconds_per_round"):
            report[f"ratio_{figure}"] = round(statistics.median(report["ours_fedavg"][figure]) /
                                              statistics.median(report["flower"][figure]), 3)
        report["accuracy_gap_pp"] = round(100 * (report["ours_fedavg"]["accuracy_per_round"][-1] -
                                                 report["flower"]["accuracy_per_round"][-1]), 2)
    from infra.plots import accuracy_png, round_cost_png

    runs = {label: run for label, run in report.items() if isinstance(run, dict)}
    title = f"{TASK}, {CLIENTS} clients, dirichlet(alpha {ALPHA})"
    accuracy_png({label: list(enumerate([run["initial_accuracy"]] + run["accuracy_per_round"]))
                  for label, run in runs.items()}, title=title, path=args.plot)
    cost_plot = args.plot.with_name(f"{args.plot.stem}_cost{args.plot.suffix}")
    round_cost_png(runs, title=f"{title}: the cost of a round", path=cost_plot)
    log(f"plots: {args.plot}, {cost_plot}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
