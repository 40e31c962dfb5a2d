"""A single-process federated simulation (no chain, no IPFS) built from the round steps in rounds.

Each client keeps its private tensors (its users' state) from one round to the next, as a device does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from processor import rounds
from processor.aggregate import apply_delta, unit_weights
from processor.evaluation import Evaluation, weighted_mean
from processor.privacy import PrivacyPlan, privatize
from processor.tasks import Task
from processor.training import TrainingSettings
from processor.weights import Weights


@dataclass(frozen=True)
class SimulationConfig:
    num_clients: int = 2
    rounds: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    training: TrainingSettings = field(default_factory=TrainingSettings)
    seed: int = 0
    pretrain_epochs: int = 0
    aggregation: str = "fedavg"
    clip_norm: float | None = None
    holdout: bool = False  # each client keeps `Task.device_holdout` of its rows out of training (federated evaluation)
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)  # how each client privatizes its delta (none by default)
    server_rate: float = 1.0  # the server's step: base + this x the merged deltas


@dataclass
class ClientRecord:
    client_id: int
    num_samples: int
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    probe_before: float | None = None  # accuracy on the client's probe set, base model
    probe_after: float | None = None  # the same, after local training
    held_out: Evaluation | None = None  # the round's merged model, with the client's private state, on its held-out rows


@dataclass
class RoundRecord:
    round: int
    test: dict[str, float]
    clients: list[ClientRecord] = field(default_factory=list)
    federated: dict[str, float] | None = None  # the clients' held_out reports, sample-weighted (with `holdout`)
    # every client's held-out rows, each scored on its device, as one set: the figure a central
    # model is measured by (an AUC also ranks one device's rows against another's)
    pooled: dict[str, float] | None = None


@dataclass
class SimulationResult:
    initial_test: dict[str, float]
    rounds: list[RoundRecord]
    final_weights: Weights

    @property
    def accuracy_per_round(self) -> list[float]:
        return [r.test["accuracy"] for r in self.rounds]


def simulate(task: Task, config: SimulationConfig,
             probes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
             on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """N clients x R rounds of: make the base, train locally, aggregate, evaluate on the test set.

    `probes` maps a client to an extra evaluation set (e.g. the classes it lacks) measured before
    and after its local training, for studying forgetting.
    """
    data = task.data()
    shards, held_out = [], []
    for k in range(config.num_clients):
        x, y = task.client_data(k, config.num_clients, scheme=config.partition, seed=config.seed, alpha=config.alpha)
        if config.holdout:
            train, held = task.device_holdout(x, seed=config.seed + k)
            held_out.append((x[held], y[held]))
            x, y = x[train], y[train]
        shards.append((x, y))
    privates = [task.initial_private() for _ in shards]  # every device starts knowing none of its users
    weights = rounds.initial_model(task, seed=config.seed, pretrain_epochs=config.pretrain_epochs,
                                   training=config.training)
    initial = task.evaluate(weights, data.x_test, data.y_test)
    history: list[RoundRecord] = []
    for round_id in range(1, config.rounds + 1):
        base = rounds.make_base(task, weights)
        updates, clients = [], []
        for k, (x, y) in enumerate(shards):
            before = privates[k]
            result = rounds.local_update(task, base.weights, base.fisher, x, y, config.training,
                                         seed=config.seed + 1000 * round_id + k, private=before)
            privates[k] = result.private
            record = ClientRecord(k, result.num_samples, result.metrics_before, result.metrics_after)
            if probes and k in probes:
                px, py = probes[k]
                record.probe_before = task.evaluate(base.weights, px, py, before)["accuracy"]
                record.probe_after = task.evaluate(apply_delta(base.weights, result.delta), px, py,
                                                   result.private)["accuracy"]
            updates.append((privatize(result.delta, config.privacy), result.num_samples))
            clients.append(record)
        merged = unit_weights(updates) if config.privacy.is_dp else updates  # DP rounds: the plain mean
        weights = rounds.aggregate(base.weights, merged, method=config.aggregation, clip_norm=config.clip_norm,
                                   server_rate=config.server_rate)
        federated = pooled = None
        if held_out:
            scores = [task.logits(weights, hx, private) for (hx, _), private in zip(held_out, privates)]
            for client, (_, hy), logits in zip(clients, held_out, scores):
                client.held_out = Evaluation.of(task.metrics(logits, hy), len(hy))
            federated = weighted_mean(c.held_out for c in clients)
            pooled = task.metrics(np.concatenate(scores), np.concatenate([hy for _, hy in held_out]))
        # the organization's panel: users no device holds, so the global part alone (cold start)
        record = RoundRecord(round_id, task.evaluate(weights, data.x_test, data.y_test), clients, federated, pooled)
        history.append(record)
        if on_round:
            on_round(record)
    return SimulationResult(initial, history, weights)
