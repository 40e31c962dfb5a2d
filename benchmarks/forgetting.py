"""Forgetting, and whether a penalty pays for itself: FedAvg, EWC, FedCurv and FedProx, each over
seeds, in five settings.

    python -m benchmarks.forgetting --json [--settings skewed dirichlet iid classes interest] [--seeds 0 1 2]
        [--methods ewc:0 ewc:10 fedcurv:0.1 fedprox:0.1]

A method is a regularizer and its lambda (`TrainingSettings.regularizer`, `ewc_lambda`; lambda 0
is FedAvg).

- skewed, dirichlet: mnist, 5 clients on the skewed split (each holds 90% of two digits) or on
  Dirichlet(0.1), 20 rounds, every client every round. Forgetting is how much a client's local
  training lowers the accuracy, on the test digits, of the classes it holds little of (less than
  5% of its rows), from the base model's; rounds to target, the first round whose test accuracy
  reaches --target.
- iid: the same on the IID split, where a penalty has nothing to correct (what it costs when the
  clients are alike); no client lacks a class, so no forgetting is measured.
- classes: mnist class-incremental: 5 clients (iid), 5 periods of two digits each (0-1, 2-3, ...),
  2 rounds per period; a round's clients hold only its period's digits.
- interest: the interest recommender on MovieLens ratings in time order: 10 clients (by user), the
  training pool cut into 4 periods, 2 rounds per period, each client training on its users'
  ratings of the round's period only (with the interest task's plan).
With --full-stack, the mnist settings' methods run instead on the full stack (a Ganache chain and
an IPFS daemon of the run's own, the organization and the clients as processes, rounds driven
through their APIs, the organization's default bounds on each client's influence), each seed:
test accuracy per round, rounds to target, and the bytes published per round (the updates and
the next base; a FedCurv update carries its Fisher beside its delta, a FedCurv base the sums).
In the continual settings (classes, interest), forgetting is how much accuracy (AUC for interest)
on each earlier period's held-out rows (each device's, `SimulationConfig.holdout`) fell from the
end of that period's rounds to the end of the run; the final figure is that of all periods'
held-out rows for interest, the test accuracy for mnist. Progress goes to stderr; the last line
of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.measure import full_stack_run, log, record_result
from processor.partition import scarce_classes
from processor.simulation import SimulationConfig, SimulationResult, simulate
from processor.tasks import Task, get_task
from processor.training import TrainingSettings

MNIST_PLAN = TrainingSettings(epochs=2)
SCARCE_SHARE = 0.05  # a class under this share of a client's rows is one it holds little of
SETTINGS = {
    "skewed": ("mnist", SimulationConfig(num_clients=5, rounds=20, partition="skewed", training=MNIST_PLAN)),
    "dirichlet": ("mnist", SimulationConfig(num_clients=5, rounds=20, partition="dirichlet", alpha=0.1,
                                            training=MNIST_PLAN)),
    "iid": ("mnist", SimulationConfig(num_clients=5, rounds=20, partition="iid", training=MNIST_PLAN)),
    "classes": ("mnist", SimulationConfig(num_clients=5, rounds=10, partition="iid", training=MNIST_PLAN,
                                          holdout=True, periods=5)),
    "interest": ("interest", SimulationConfig(num_clients=10, rounds=8, partition="by-user",
                                              training=get_task("interest").plan, holdout=True, periods=4)),
}


DEFAULT_METHODS = ("ewc:0", "ewc:10", "fedcurv:0.1", "fedprox:0.1")  # fedcurv at the recommended lambda


def method(text: str) -> tuple[str, float]:
    """"regularizer:lambda" as the pair, checked by TrainingSettings."""
    regularizer, _, lam = text.partition(":")
    try:
        settings = TrainingSettings(regularizer=regularizer, ewc_lambda=float(lam))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return settings.regularizer, settings.ewc_lambda


def label_of(regularizer: str, lam: float) -> str:
    return "fedavg" if lam == 0 else f"{regularizer} {lam:g}"


def probes(task: Task, config: SimulationConfig) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each client's probe: the test rows of the classes it holds little of."""
    data = task.data()
    classes = np.unique(data.y_train)
    found = {}
    for k in range(config.num_clients):
        _, y = task.client_data(k, config.num_clients, scheme=config.partition, seed=config.seed, alpha=config.alpha)
        scarce = np.isin(data.y_test, scarce_classes(y, classes, SCARCE_SHARE))
        if scarce.any():
            found[k] = (data.x_test[scarce], data.y_test[scarce])
    return found


def summary(result: SimulationResult, config: SimulationConfig, metric: str, target: float) -> dict:
    """Final figure, rounds to target (continual: none) and forgetting of one run."""
    if config.periods > 1:
        # interest: every period's held-out rows (its test panel is cold start); mnist: the test digits
        figures = [r.pooled[metric] if metric == "auc" else r.test[metric] for r in result.rounds]
        return {"final": round(figures[-1], 4), "rounds_to_target": None,
                "forgetting": round(result.forgetting(metric), 4), "per_round": [round(f, 4) for f in figures]}
    clients = [c for r in result.rounds for c in r.clients if c.probe_before is not None]
    reached = [r.round for r in result.rounds if r.test[metric] >= target]
    return {"final": round(result.rounds[-1].test[metric], 4), "rounds_to_target": reached[0] if reached else None,
            "forgetting": round(float(np.mean([c.probe_before - c.probe_after for c in clients])), 4)
            if clients else None,
            "per_round": [round(r.test[metric], 4) for r in result.rounds]}


def spread(values: list) -> dict:
    """Mean and half the range over seeds (None when a seed has no value: e.g. target not reached)."""
    if any(v is None for v in values):
        return {"mean": None, "half_range": None, "seeds": values}
    return {"mean": round(float(np.mean(values)), 4), "half_range": round((max(values) - min(values)) / 2, 4),
            "seeds": values}


def full_stack(setting: str, regularizer: str, lam: float, seed: int, target: float) -> dict:
    """One run of a mnist setting on the full stack: what `summary` gives, less forgetting, plus
    the mean bytes published per round (the updates and the next base)."""
    from demo import DemoOptions

    task_name, config = SETTINGS[setting]
    label = f"forgetting-{setting}-{regularizer}-{lam:g}-{seed}"
    options = DemoOptions(task=task_name, clients=config.num_clients, rounds=config.rounds,
                          partition=config.partition, alpha=config.alpha, seed=seed,
                          training=replace(config.training, regularizer=regularizer, ewc_lambda=lam),
                          straggler=False, late_joiner=False, drive=True,  # every client every round
                          plot_path=Path(tempfile.gettempdir()) / f"{label}.png")
    rows = full_stack_run(options, label)["rounds"]
    accuracies = [row["accuracy"] for row in rows]
    reached = [row["round"] for row in rows if row["accuracy"] >= target]
    return {"final": round(accuracies[-1], 4), "rounds_to_target": reached[0] if reached else None,
            "bytes_per_round": round(float(np.mean([row["bytes"] for row in rows]))),
            "per_round": [round(a, 4) for a in accuracies]}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    cli.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    cli.add_argument("--methods", nargs="+", type=method, default=[method(m) for m in DEFAULT_METHODS],
                     help="regularizer:lambda, e.g. fedcurv:0.1 (ewc:0 is FedAvg)")
    cli.add_argument("--target", type=float, default=0.85, help="the mnist test accuracy rounds are counted to")
    cli.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    cli.add_argument("--full-stack", action="store_true", help="run the mnist settings on the full stack")
    args = cli.parse_args()
    if args.full_stack and {"classes", "interest"} & set(args.settings):
        cli.error("--full-stack runs the mnist settings skewed, dirichlet and iid only")

    report = {"seeds": args.seeds, "target": args.target, "settings": {}}
    for setting in args.settings:
        task_name, shape = SETTINGS[setting]
        task = get_task(task_name)
        metric = "auc" if task_name == "interest" else "accuracy"
        report["settings"][setting] = {"metric": metric}
        for regularizer, lam in args.methods:
            label = label_of(regularizer, lam)
            runs = []
            for seed in args.seeds:
                if args.full_stack:
                    runs.append(full_stack(setting, regularizer, lam, seed, args.target))
                    log(f"{setting} {label} seed {seed}, full stack: final {runs[-1]['final']:.4f}, rounds to "
                        f"target {runs[-1]['rounds_to_target']}, {runs[-1]['bytes_per_round']} bytes per round")
                    continue
                config = replace(shape, seed=seed,
                                 training=replace(shape.training, regularizer=regularizer, ewc_lambda=lam))
                started = time.perf_counter()
                result = simulate(task, config, probes=None if config.periods > 1 else probes(task, config))
                runs.append(summary(result, config, metric, args.target))
                log(f"{setting} {label} seed {seed}: final {metric} {runs[-1]['final']:.4f}, rounds to target "
                    f"{runs[-1]['rounds_to_target']}, forgetting {runs[-1]['forgetting']} "
                    f"({time.perf_counter() - started:.0f} s)")
            figures = [key for key in ("final", "rounds_to_target", "forgetting", "bytes_per_round") if key in runs[0]]
            report["settings"][setting][label] = {**{key: spread([r[key] for r in runs]) for key in figures},
                                                  "per_round": [r["per_round"] for r in runs]}
    record_result(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
