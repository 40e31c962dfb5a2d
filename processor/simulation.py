"""A single-process federated simulation (no chain, no IPFS) built from the round steps in rounds.

Each client keeps its private tensors (its users' state) from one round to the next, as a device does.
With `periods` > 1 the schedule is continual: the training pool is cut into periods (`Task.periods`:
MovieLens ratings in time order, digits by class) and each round's clients train on one period's
rows, the earlier periods' rows no longer at hand; what the model forgets of those is measured on
each period's held-out rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from processor import penalty, rounds
from processor.aggregate import apply_delta, unit_weights
from processor.evaluation import Evaluation, weighted_mean
from processor.penalty import RoundCurvature, SentStatistics
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
    periods: int = 1  # continual when > 1: round r trains on period (r - 1) * periods // rounds only

    def __post_init__(self) -> None:
        if not 1 <= self.periods <= self.rounds:
            raise ValueError(f"a schedule of {self.rounds} rounds cannot cover {self.periods} periods")

    def period_of_round(self, round_id: int) -> int:
        """The period whose rows round `round_id` (from 1) trains on: periods in order, equal runs of rounds."""
        return (round_id - 1) * self.periods // self.rounds


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
    period: int = 0  # the period this round trained on
    # with `holdout`: the pooled metrics of each period's held-out rows, of the periods trained so far
    per_period: list[dict[str, float]] = field(default_factory=list)


@dataclass
class SimulationResult:
    initial_test: dict[str, float]
    rounds: list[RoundRecord]
    final_weights: Weights

    @property
    def accuracy_per_round(self) -> list[float]:
        return [r.test["accuracy"] for r in self.rounds]

    def forgetting(self, metric: str) -> float:
        """Continual (with `holdout`): how much `metric` on each earlier period's held-out rows fell
        from the end of that period's rounds to the end of the run, averaged over those periods."""
        final = self.rounds[-1]
        ends = {r.period: r for r in self.rounds}  # each period's last round
        drops = [ends[p].per_period[p][metric] - final.per_period[p][metric] for p in range(final.period)]
        if not drops:
            raise ValueError("forgetting needs a continual run of two periods or more, with holdout")
        return float(np.mean(drops))


def simulate(task: Task, config: SimulationConfig,
             probes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
             on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """N clients x R rounds of: make the base, train locally, aggregate, evaluate on the test set.

    `probes` maps a client to an extra evaluation set (e.g. the classes it lacks) measured before
    and after its local training, for studying forgetting.
    """
    data = task.data()
    shards, held_out = [], []  # per client: (x, y, period of each row)
    for k in range(config.num_clients):
        index = task.client_index(k, config.num_clients, scheme=config.partition, seed=config.seed, alpha=config.alpha)
        x, y = task.device_rows(data, index)
        period = task.periods(config.periods)[index]
        train = np.arange(len(y))
        if config.holdout:  # held out within each period, so every period has rows to measure forgetting on
            train, held = [], []
            for p in range(config.periods):
                rows = np.flatnonzero(period == p)
                kept, out = task.device_holdout(x[rows], seed=config.seed + k)
                train.append(rows[kept])
                held.append(rows[out])
            train, held = np.concatenate(train), np.concatenate(held)
            held_out.append((x[held], y[held], period[held]))
        shards.append((x[train], y[train], period[train]))
    privates = [task.initial_private() for _ in shards]  # every device starts knowing none of its users
    weights = rounds.initial_model(task, seed=config.seed, pretrain_epochs=config.pretrain_epochs,
                                   training=config.training)
    initial = task.evaluate(weights, data.x_test, data.y_test)
    history: list[RoundRecord] = []
    published: RoundCurvature | None = None  # FedCurv: the statistics of the last round's clients
    sent: dict[int, SentStatistics] = {}  # FedCurv: what each client sent to the round it last took part in
    for round_id in range(1, config.rounds + 1):
        base = rounds.make_base(task, weights)
        current = config.period_of_round(round_id)
        updates, clients, merged = [], [], []
        for k, (x, y, period) in enumerate(shards):
            rows = period == current
            if not rows.any():
                continue  # nothing of this period on the device: it sits the round out
            x, y = x[rows], y[rows]
            before = privates[k]
            others = penalty.others_for(published, str(k), sent.get(k))
            result = rounds.local_update(task, base.weights, base.fisher, x, y, config.training,
                                         seed=config.seed + 1000 * round_id + k, private=before, others=others)
            privates[k] = result.private
            if result.fisher is not None:
                sent[k] = SentStatistics(round_id, base.weights, result.delta, result.fisher)
                merged.append((str(k), sent[k], 1.0))
            record = ClientRecord(k, result.num_samples, result.metrics_before, result.metrics_after)
            if probes and k in probes:
                px, py = probes[k]
                record.probe_before = task.evaluate(base.weights, px, py, before)["accuracy"]
                record.probe_after = task.evaluate(apply_delta(base.weights, result.delta), px, py,
                                                   result.private)["accuracy"]
            updates.append((privatize(result.delta, config.privacy), result.num_samples))
            clients.append(record)
        published = penalty.round_curvature(round_id, merged)
        weights = rounds.aggregate(base.weights, unit_weights(updates) if config.privacy.is_dp else updates,
                                   method=config.aggregation, clip_norm=config.clip_norm,
                                   server_rate=config.server_rate)  # DP rounds: the plain mean
        federated = pooled = None
        per_period = []
        if held_out:
            reports, scores, labels, periods = {}, [], [], []
            for k, ((hx, hy, hp), private) in enumerate(zip(held_out, privates)):
                seen = hp <= current
                if not seen.any():
                    continue
                logits = task.logits(weights, hx[seen], private)
                reports[k] = Evaluation.of(task.metrics(logits, hy[seen]), int(seen.sum()))
                scores.append(logits)
                labels.append(hy[seen])
                periods.append(hp[seen])
            for client in clients:
                client.held_out = reports.get(client.client_id)
            federated = weighted_mean(reports.values())
            scores, labels, periods = np.concatenate(scores), np.concatenate(labels), np.concatenate(periods)
            pooled = task.metrics(scores, labels)
            per_period = [task.metrics(scores[periods == p], labels[periods == p]) for p in range(current + 1)]
        # the organization's panel: users no device holds, so the global part alone (cold start)
        record = RoundRecord(round_id, task.evaluate(weights, data.x_test, data.y_test), clients, federated, pooled,
                             current, per_period)
        history.append(record)
        if on_round:
            on_round(record)
    return SimulationResult(initial, history, weights)
