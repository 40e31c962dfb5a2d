"""What privacy costs: client-level differential privacy's accuracy, in the one-process simulation,
and secure aggregation's time and bytes on the full stack (benchmarks.secagg).

    python -m benchmarks.privacy --json [--epsilons 1 4 8] [--mnist-clients 1000] [--mnist-rounds 20]
        [--mnist-clip 3] [--mnist-server-rate 3] [--interest-clients 200] [--interest-rounds 5]
        [--interest-clip 1.5] [--interest-server-rate 1] [--search-clients 100 250 500 1000]
        [--secagg-counts 20 100] [--only mnist|interest|search|secagg]

DP-FedAvg (processor.privacy): each client clips its delta to C and the round's sum carries Gaussian
noise of std z * C, z calibrated so that the rounds spend epsilon at delta 1e-5 (dp-accounting's
RDP accountant, no amplification by sampling: every client takes part in every round). The noise is
that of distributed DP, the product's setting with secure aggregation: each client adds
z * C / sqrt(n) and the n clients' sum carries z * C. (Without secure aggregation each public
delta carries z * C itself, and the mean sqrt(n) times the noise: local DP, far costlier; --local-dp
measures it.) A DP
round merges the plain mean of the clipped noised deltas; the server then steps by `server_rate`
times it (a server learning rate, as in Reddi et al.'s FedOpt: the noise on the mean shrinks as
1/n, and clipping shortens every update, so the server takes longer steps than plain FedAvg's 1).

mnist trains all its clients at once (processor.batched_mlp, checked against rounds.local_update in
tests/test_privacy.py); there the n clients' noise, each N(0, s^2) per coordinate, is drawn as its
sum, one N(0, n s^2), which is the same distribution. The interest task trains its clients with
Keras through processor.simulation, each client drawing its own noise.

accuracy_cost_pp: the no-DP run's final test accuracy minus the DP run's, in percentage points, on
the organization's test set (the same clients, rounds, local training and server rate; no DP = plain
sample-weighted FedAvg, unclipped); clip_only_accuracy: the deltas clipped as in the DP runs but
merged as in a round without noise (sample-weighted): what clipping alone costs. The clip norms
are about the median norm of the clients' deltas in round 1 (mnist 2.9, interest 1.5).
clients_for_3pp_at_eps8: the fewest mnist clients per round (of
those tried, the training pool of 3,500 rows split among them) at which epsilon 8 costs at most 3 pp.
secagg and sum_error: benchmarks.secagg's figures (its docstring says how each is measured).
The last stdout line is the JSON.
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import secagg
from benchmarks.measure import log, report
from processor import aggregate as agg
from processor import batched_mlp, partition, privacy, rounds
from processor.privacy import PrivacyPlan
from processor.simulation import SimulationConfig, simulate
from processor.tasks import get_task
from processor.training import TrainingSettings

DELTA = 1e-5
# Local training of the mnist clients: a few samples each, so a few large steps.
MNIST_TRAINING = TrainingSettings(epochs=5, batch_size=32, learning_rate=0.5, update_dtype="float32")


def dp_plan(epsilon: float, rounds_: int, clients: int, clip_norm: float, local: bool = False) -> PrivacyPlan:
    """The plan of `rounds_` rounds of `clients`, each adding its share of the sum's noise, spending
    `epsilon` at DELTA; `local`: each adding the whole noise to its public delta."""
    z = privacy.noise_multiplier_for(epsilon, rounds_, DELTA)
    secure = {} if local else {"secure_aggregation": True, "threshold": clients}
    return PrivacyPlan(clip_norm=clip_norm, noise_multiplier=z, delta=DELTA, **secure)


def mnist_accuracy(clients: int, rounds_: int, plan: PrivacyPlan, server_rate: float,
                   training: TrainingSettings = MNIST_TRAINING, seed: int = 0) -> float:
    """Final test accuracy of `rounds_` rounds of `clients` mnist clients (all in every round)."""
    task = get_task("mnist")
    data = task.data()
    shards = [task.device_rows(data, part) for part in partition.split("iid", data.y_train, clients, seed)]
    weights = rounds.initial_model(task, seed=seed)
    for round_id in range(1, rounds_ + 1):
        stacked = batched_mlp.local_deltas(task, weights, shards, training,
                                           [seed + 1000 * round_id + k for k in range(clients)])
        deltas = [privacy.clip({name: stacked[name][k] for name in stacked}, plan.clip_norm) for k in range(clients)]
        if plan.is_dp:  # as simulation and screen merge a DP round: the plain mean, and here its noise
            mean = agg.weighted_mean(agg.unit_weights((d, 0) for d in deltas))
            # the clients' noise shares summed: N(0, n s^2), and the mean's a 1/n of it
            mean = privacy.with_noise(mean, privacy.client_noise_std(plan) * math.sqrt(clients) / clients)
        else:
            mean = agg.weighted_mean((d, len(y)) for d, (_, y) in zip(deltas, shards))
        weights = agg.apply_delta(weights, {name: server_rate * t for name, t in mean.items()})
    data = task.data()
    return task.evaluate(weights, data.x_test, data.y_test)["accuracy"]


def interest_accuracy(clients: int, rounds_: int, plan: PrivacyPlan, server_rate: float, seed: int = 0) -> float:
    task = get_task("interest")
    config = SimulationConfig(num_clients=clients, rounds=rounds_, partition="by-user", training=task.plan,
                              seed=seed, privacy=plan, server_rate=server_rate)
    return simulate(task, config).rounds[-1].test["accuracy"]  # the organization's panel: cold start


def cost_table(name: str, accuracy, epsilons: list[float], clients: int, rounds_: int, clip_norm: float,
               server_rate: float, local: bool) -> dict:
    baseline = accuracy(clients, rounds_, PrivacyPlan(), server_rate)
    log(f"{name}: {clients} clients, {rounds_} rounds, no DP: accuracy {100 * baseline:.2f} %")
    clipped = accuracy(clients, rounds_, PrivacyPlan(clip_norm=clip_norm), server_rate)
    log(f"{name}: clipped to {clip_norm:g}, no noise: accuracy {100 * clipped:.2f} %")
    table = {"no_dp_accuracy": round(baseline, 4), "clip_only_accuracy": round(clipped, 4)}
    for epsilon in epsilons:
        plan = dp_plan(epsilon, rounds_, clients, clip_norm, local)
        reached = accuracy(clients, rounds_, plan, server_rate)
        log(f"{name}: epsilon {epsilon:g} (z {plan.noise_multiplier:.3f}, C {clip_norm:g}): accuracy "
            f"{100 * reached:.2f} % against {100 * baseline:.2f} % without DP")
        table[f"{epsilon:g}"] = {"accuracy_cost_pp": round(100 * (baseline - reached), 2), "accuracy": round(reached, 4),
                                 "noise_multiplier": round(plan.noise_multiplier, 4), "clip_norm": clip_norm,
                                 "clients": clients, "rounds": rounds_, "server_rate": server_rate}
    return table


def fewest_clients_for(cost_pp: float, epsilon: float, candidates: list[int], rounds_: int, clip_norm: float,
                       server_rate: float) -> int | None:
    """The fewest of `candidates` (tried in increasing order) at which `epsilon` costs at most `cost_pp` on mnist."""
    for clients in sorted(candidates):
        baseline = mnist_accuracy(clients, rounds_, PrivacyPlan(), server_rate)
        reached = mnist_accuracy(clients, rounds_, dp_plan(epsilon, rounds_, clients, clip_norm), server_rate)
        log(f"mnist, {clients} clients: epsilon {epsilon:g} costs {100 * (baseline - reached):.2f} pp "
            f"({100 * reached:.2f} % against {100 * baseline:.2f} %)")
        if 100 * (baseline - reached) <= cost_pp:
            return clients
    return None


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--json", action="store_true", help="print only the JSON line")
    cli.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    cli.add_argument("--mnist-clients", type=int, default=1000)
    cli.add_argument("--mnist-rounds", type=int, default=20)
    cli.add_argument("--mnist-clip", type=float, default=3.0)
    cli.add_argument("--mnist-server-rate", type=float, default=3.0)
    cli.add_argument("--interest-clients", type=int, default=200)
    cli.add_argument("--interest-rounds", type=int, default=5)
    cli.add_argument("--interest-clip", type=float, default=1.5)
    cli.add_argument("--interest-server-rate", type=float, default=1.0)
    cli.add_argument("--search-clients", type=int, nargs="+", default=[100, 250, 500, 1000],
                     help="mnist clients per round tried for clients_for_3pp_at_eps8")
    cli.add_argument("--secagg-counts", type=int, nargs="+", default=list(secagg.COUNTS),
                     help="clients of the full-stack rounds with and without secure aggregation")
    cli.add_argument("--only", choices=["mnist", "interest", "search", "secagg"], help="one part only")
    cli.add_argument("--local-dp", action="store_true",
                     help="each client adds the whole noise to its public delta (no secure aggregation)")
    args = cli.parse_args()
    result: dict = {"dp": {}}
    if args.only in (None, "mnist"):
        result["dp"]["mnist"] = cost_table("mnist", mnist_accuracy, args.epsilons, args.mnist_clients,
                                           args.mnist_rounds, args.mnist_clip, args.mnist_server_rate, args.local_dp)
    if args.only in (None, "search"):
        result["clients_for_3pp_at_eps8"] = fewest_clients_for(3.0, 8.0, args.search_clients, args.mnist_rounds,
                                                               args.mnist_clip, args.mnist_server_rate)
    if args.only in (None, "interest"):
        result["dp"]["interest"] = cost_table("interest", interest_accuracy, args.epsilons, args.interest_clients,
                                              args.interest_rounds, args.interest_clip, args.interest_server_rate,
                                              args.local_dp)
    if args.only in (None, "secagg"):
        result.update(secagg.measure(args.secagg_counts, rounds=3, hostile_rounds=10, parts=["recovery", "timing"]))
    report(result, args.json)


if __name__ == "__main__":
    main()
