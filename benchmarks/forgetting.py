"""Catastrophic forgetting: plain FedAvg against FedAvg with EWC on the original's skewed split.

    python -m benchmarks.forgetting --json [--rounds 5] [--lam 20] [--plot results/forgetting.png]

Two clients: A holds 90% of digits 0-4 and 10% of 5-9, B the reverse. "Retained accuracy" is a
client's locally trained model on the test digits it holds little of; "forgetting" is how much
local training lowered that accuracy from the base model's. Progress goes to stderr; the last
line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from infra.files import REPO_ROOT
from infra.plots import accuracy_png
from processor.partition import minority_classes
from processor.simulation import SimulationConfig, SimulationResult, simulate
from processor.tasks import get_task
from processor.training import TrainingSettings


def summarise(result: SimulationResult) -> dict:
    clients = [c for r in result.rounds for c in r.clients]
    return {
        "accuracy_per_round": [round(a, 4) for a in result.accuracy_per_round],
        "retained_accuracy": round(float(np.mean([c.probe_after for c in clients])), 4),
        "forgetting": round(float(np.mean([c.probe_before - c.probe_after for c in clients])), 4),
        "final_accuracy": round(result.accuracy_per_round[-1], 4),
        "initial_accuracy": round(result.initial_test["accuracy"], 4),
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--task", default="mnist")
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--lam", type=float, default=3000.0, help="EWC lambda of the EWC run")
    TrainingSettings.add_flags(cli, defaults=TrainingSettings(epochs=2), exclude=("ewc_lambda", "update_dtype"))
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--pretrain-epochs", type=int, default=20,
                     help="the organization pretrains the first base model on its validation data")
    cli.add_argument("--plot", type=Path, default=REPO_ROOT / "results" / "forgetting.png")
    cli.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    args = cli.parse_args()

    task = get_task(args.task)
    data = task.data()
    probes = {}
    for client in range(2):
        mask = np.isin(data.y_test, minority_classes(data.y_test, 2, client))
        probes[client] = (data.x_test[mask], data.y_test[mask])

    report = {"task": args.task, "rounds": args.rounds, "lambda": args.lam}
    for label, lam in (("fedavg", 0.0), ("ewc", args.lam)):
        config = SimulationConfig(num_clients=2, rounds=args.rounds, partition="skewed",
                                  training=TrainingSettings.from_args(args, ewc_lambda=lam), seed=args.seed,
                                  pretrain_epochs=args.pretrain_epochs)
        started = time.perf_counter()

        def show(record, label=label, started=started):
            forgetting = np.mean([c.probe_before - c.probe_after for c in record.clients])
            print(f"{label:6s} round {record.round}/{args.rounds}: test accuracy {record.test['accuracy']:.4f}, "
                  f"forgetting {forgetting:.4f} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

        report[label] = summarise(simulate(task, config, probes=probes, on_round=show))

    curves = {"FedAvg (lambda 0)": list(enumerate([report["fedavg"]["initial_accuracy"]]
                                                    + report["fedavg"]["accuracy_per_round"])),
              f"EWC (lambda {args.lam:g})": list(enumerate([report["ewc"]["initial_accuracy"]]
                                                            + report["ewc"]["accuracy_per_round"]))}
    accuracy_png(curves, title=f"{args.task}, skewed split, 2 clients: test accuracy per round", path=args.plot)
    print(f"plot: {args.plot}", file=sys.stderr)
    for label in ("fedavg", "ewc"):
        r = report[label]
        print(f"{label:6s} final {r['final_accuracy']:.4f}  retained {r['retained_accuracy']:.4f}  "
              f"forgetting {r['forgetting']:.4f}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
