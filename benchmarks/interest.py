"""The interest task's recommender, federated with and without private user state, against the
same architecture trained centrally and against always answering the majority label.

    python -m benchmarks.interest --json [--clients 20] [--rounds 20] [--epochs 3] [--batch-size 64]
        [--learning-rate 1.0] [--regularizer fedprox] [--ewc-lambda 0.01]

Each client (a group of users, `by-user` partition) holds out its users' latest 20% of ratings
(`RecommenderTask.device_holdout`) and, after every round, scores them with the merged model and
its own private user state. The figures are those of all clients' held-out rows taken together
(`RoundRecord.pooled`); the centralized ceiling is scored on the same rows; the sample-weighted
mean of the devices' own reports (federated evaluation, as the apps report it) goes to stderr.
The cold-start AUC is the organization's panel of users no device holds, scored by the global
part alone. Progress goes to stderr; the last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np

from benchmarks.measure import record_result
from processor import rounds
from processor.evaluation import Evaluation, majority_baseline, weighted_mean
from processor.simulation import SimulationConfig, SimulationResult, simulate
from processor.tasks import INTEREST_PLAN, USER_COLUMN, RecommenderTask, get_task, interest_task
from processor.training import TrainingSettings


def per_round(result: SimulationResult) -> dict:
    return {"auc_per_round": [round(r.pooled["auc"], 4) for r in result.rounds],
            "accuracy_per_round": [round(r.pooled["accuracy"], 4) for r in result.rounds]}


def devices(task: RecommenderTask, config: SimulationConfig) -> list[tuple[np.ndarray, ...]]:
    """(x train, y train, x held out, y held out) of every client, as the simulation splits them."""
    split = []
    for k in range(config.num_clients):
        x, y = task.client_data(k, config.num_clients, scheme=config.partition, seed=config.seed)
        train, held = task.device_holdout(x, seed=config.seed + k)
        split.append((x[train], y[train], x[held], y[held]))
    return split


def central(task: RecommenderTask, config: SimulationConfig, training: TrainingSettings) -> dict:
    """The same architecture trained on every client's training rows at once (each user its own
    slot in one table), measured on each client's held-out rows as the federated runs are."""
    split, offset = [], 0
    for x, y, hx, hy in devices(task, config):
        users = int(max(x[:, USER_COLUMN].max(), hx[:, USER_COLUMN].max())) + 1
        for rows in (x, hx):
            rows[:, USER_COLUMN] += offset
        split.append((x, y, hx, hy))
        offset += users
    if offset > task.users:
        raise ValueError(f"{offset} users do not fit the private table's {task.users} slots")
    weights = rounds.initial_model(task, seed=config.seed)
    zeros = {n: np.zeros_like(w) for n, w in weights.items()}
    trained = rounds.train(task, weights, zeros, np.concatenate([s[0] for s in split]),
                           np.concatenate([s[1] for s in split]), training, seed=config.seed)
    global_part, private = rounds.shared(task, trained), rounds.private_part(task, trained)
    scores = [task.logits(global_part, hx, private) for _, _, hx, _ in split]
    mean = weighted_mean(Evaluation.of(task.metrics(logits, hy), len(hy)) for logits, (*_, hy) in zip(scores, split))
    print(f"central: per-device mean AUC {mean['auc']:.4f}, accuracy {mean['accuracy']:.4f}", file=sys.stderr)
    pooled = task.metrics(np.concatenate(scores), np.concatenate([hy for *_, hy in split]))
    return {"auc": round(pooled["auc"], 4), "accuracy": round(pooled["accuracy"], 4)}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--clients", type=int, default=20)
    cli.add_argument("--rounds", type=int, default=20)
    cli.add_argument("--central-epochs", type=int, default=8, help="epochs of the centralized ceiling")
    cli.add_argument("--central-learning-rate", type=float, default=0.3,
                     help="its SGD learning rate (a ceiling: slower and longer than a round's local training)")
    TrainingSettings.add_flags(cli, defaults=INTEREST_PLAN, exclude=("update_dtype",))
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    args = cli.parse_args()

    task = get_task("interest")
    config = SimulationConfig(num_clients=args.clients, rounds=args.rounds, partition="by-user",
                              training=TrainingSettings.from_args(args), seed=args.seed, holdout=True)
    results = {}
    for label, variant in (("federated", task),
                           ("federated_no_user_state", interest_task(task.data, user_state=False))):
        started = time.perf_counter()

        def show(record, label=label, started=started):
            print(f"{label} round {record.round}/{args.rounds}: AUC {record.pooled['auc']:.4f}, accuracy "
                  f"{record.pooled['accuracy']:.4f} (per-device mean AUC {record.federated['auc']:.4f}, accuracy "
                  f"{record.federated['accuracy']:.4f}); cold-start AUC {record.test['auc']:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

        results[label] = simulate(variant, config, on_round=show)
    report = {label: per_round(result) for label, result in results.items()}
    started = time.perf_counter()
    # plain SGD: the federated plan's proximal pull has no counterpart in one central training
    report["central"] = central(task, config, replace(config.training, epochs=args.central_epochs,
                                                      learning_rate=args.central_learning_rate, ewc_lambda=0.0))
    print(f"central: {report['central']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    held_labels = np.concatenate([hy for *_, hy in devices(task, config)])
    report["majority"] = {"accuracy": round(majority_baseline(held_labels)["accuracy"], 4)}
    report["cold_start"] = {"auc": round(results["federated"].rounds[-1].test["auc"], 4)}
    record_result(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
