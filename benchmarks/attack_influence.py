"""One malicious client out of five against the organization's check-and-merge (processor.screen).

    python -m benchmarks.attack_influence [--task mnist] [--warmup 3] [--seeds 0 1 2]

mnist, 5 clients, dirichlet(0.5), the clients' default training. After `--warmup` honest rounds
(merged with the default policy), four honest clients train on the round's base and the fifth
sends a crafted delta claiming the most samples the contract accepts, at the longest norm the
checks let through. For each attack the round's test accuracy is compared with the merge of the
four honest updates alone (same policy): `accuracy_change_pp` is attacked minus honest-only, so a
drop is negative; the goal is no drop beyond 3 pp. The same attacks against plain FedAvg (no caps,
no consensus check, the old fixed norm bound of 1e3) show what the bounds are worth. Progress on
stderr, one JSON line last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from benchmarks.measure import log, record_result
from infra import chain
from processor import codec, rounds
from processor.aggregate import l2_norm
from processor.screen import MergePolicy, Received, merge_round, policy_for
from processor.tasks import get_task
from processor.training import TrainingSettings

CLIENTS = 5
BASE_CID = "bafkreibase"  # the checks compare it, nothing fetches it
UNDEFENDED = policy_for("none", max_norm=1e3)
ATTACKS = ("sign_flip", "sign_flip_evading_cosine", "model_replacement", "scaled_honest",
           "honest_claiming_max_samples")


def address(k: int) -> str:
    return f"0x{k + 1:040x}"


def encoded(task, delta, round_id: int, client: int, num_samples: int) -> Received:
    data = codec.encode_delta(task, delta, round_id=round_id, base_cid=BASE_CID, num_samples=num_samples,
                              client=address(client), dtype="float32")
    return Received(address(client), num_samples, data)


def longest_admitted(direction: dict, honest_norms: list[float], policy: MergePolicy) -> dict:
    """`direction` scaled to just under the longest norm `policy` lets through beside these honest norms."""
    norm = l2_norm(direction)
    limit = policy.max_norm
    if policy.reject_multiple is not None:  # the attacker's own norm counts in the median: the largest
        limit = min(limit, policy.reject_multiple * float(np.median([*honest_norms, np.inf])))
    return {n: (t * (0.999 * limit / norm)).astype(np.float32) for n, t in direction.items()}


def attack_delta(name: str, task, base, honest, attacker_update, target, honest_norms, policy) -> dict:
    mean = {n: np.mean([u.delta[n] for u in honest], axis=0) for n in base.weights}
    if name == "sign_flip":
        return longest_admitted({n: -t for n, t in mean.items()}, honest_norms, policy)
    if name == "sign_flip_evading_cosine":  # as much of the flip as keeps a positive cosine with the consensus
        consensus = {n: np.median([u.delta[n] for u in honest], axis=0) for n in base.weights}
        c_norm = l2_norm(consensus)
        along = sum(float(np.sum(-mean[n].astype(np.float64) * consensus[n])) for n in base.weights) / c_norm**2
        orthogonal = {n: -mean[n] - along * consensus[n] for n in base.weights}
        o_norm = l2_norm(orthogonal)
        return longest_admitted({n: orthogonal[n] / o_norm + 0.05 * consensus[n] / c_norm for n in base.weights},
                                honest_norms, policy)
    if name == "model_replacement":  # Bagdasaryan et al. 2020: towards a model of the attacker's choosing
        return longest_admitted({n: target[n] - base.weights[n] for n in base.weights}, honest_norms, policy)
    if name == "scaled_honest":
        return longest_admitted(attacker_update.delta, honest_norms, policy)
    return attacker_update.delta


def run_seed(task, seed: int, warmup: int, policy: MergePolicy) -> dict:
    data = task.data()
    shards = [task.client_data(k, CLIENTS, scheme="dirichlet", seed=seed, alpha=0.5) for k in range(CLIENTS)]
    weights = rounds.initial_model(task, seed=seed)
    target = rounds.initial_model(task, seed=seed + 12345)  # the attacker's model: another random one

    def train_all(base, round_id):
        return [rounds.local_update(task, base.weights, base.fisher, x, y, TrainingSettings(),
                                    seed=seed + 1000 * round_id + k) for k, (x, y) in enumerate(shards)]

    for round_id in range(1, warmup + 1):
        base = rounds.make_base(task, weights)
        updates = [encoded(task, u.delta, round_id, k, u.num_samples) for k, u in enumerate(train_all(base, round_id))]
        weights = merge_round(task, base.weights, updates, round_id, BASE_CID, policy).weights
    round_id = warmup + 1
    base = rounds.make_base(task, weights)
    trained = train_all(base, round_id)
    honest, attacker_update = trained[:-1], trained[-1]
    honest_received = [encoded(task, u.delta, round_id, k, u.num_samples) for k, u in enumerate(honest)]

    def accuracy(merge_policy, received) -> float:
        merged = merge_round(task, base.weights, received, round_id, BASE_CID, merge_policy).weights
        return task.evaluate(merged, data.x_test, data.y_test)["accuracy"]

    result = {"base_accuracy": task.evaluate(base.weights, data.x_test, data.y_test)["accuracy"]}
    for label, merge_policy in (("defended", policy), ("undefended", UNDEFENDED)):
        honest_only = accuracy(merge_policy, honest_received)
        norms = [l2_norm(u.delta) for u in honest]
        moved = {}
        for name in ATTACKS:
            delta = attack_delta(name, task, base, honest, attacker_update, target, norms, merge_policy)
            attacked = accuracy(merge_policy, [*honest_received, encoded(task, delta, round_id, CLIENTS - 1,
                                                                         chain.DEFAULT_MAX_SAMPLES)])
            moved[name] = round(100 * (attacked - honest_only), 2)
        result[label] = {"honest_only_accuracy": round(honest_only, 4), "accuracy_change_pp": moved}
        log(f"seed {seed} {label}: honest-only {honest_only:.4f}, change in pp {moved}")
    result["base_accuracy"] = round(result["base_accuracy"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--warmup", type=int, default=3, help="honest rounds before the attacked one")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    task = get_task(args.task)
    policy = MergePolicy()
    runs = {seed: run_seed(task, seed, args.warmup, policy) for seed in args.seeds}

    def worst(label: str, of=lambda v: -v) -> float:  # the largest drop (or, with abs, the largest move)
        return max(of(v) for r in runs.values() for v in r[label]["accuracy_change_pp"].values())

    result = {"benchmark": "attack_influence", "task": args.task, "clients": CLIENTS,
              "partition": "dirichlet(0.5)", "attacked_round": args.warmup + 1,
              "policy": dataclasses.asdict(policy),
              "runs": runs, "worst_drop_pp": worst("defended"), "worst_move_pp": worst("defended", abs),
              "worst_drop_pp_undefended": worst("undefended"), "goal_drop_pp": 3.0,
              "met": worst("defended") <= 3.0}
    print(json.dumps(result))
    record_result(result)


if __name__ == "__main__":
    main()
