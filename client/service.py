"""A device's side of a round: pull the base model, train on local data with EWC, publish the delta.

The local data never leaves this process: only the delta goes to IPFS and its CID to the chain.
Neither does what the device learns of its own users (a recommender's private tensors): it keeps
them from round to round, in memory and in its state directory, so that a restart keeps them.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from eth_account import Account

from client import secure_round
from infra import chain, ipfs
from infra.files import write_atomically
from infra.settings import Settings
from infra.webapp import (
    ActionError,
    Job,
    PhaseTimer,
    deadline_text,
    describe_error,
    find_registry,
    outage_text,
    retrying,
    store_status,
)
from processor import codec, penalty, privacy, rounds, secure_sum
from processor.device_data import DeviceDataError
from processor.evaluation import Evaluation, majority_baseline
from processor.penalty import Curvature, RoundCurvature, SentStatistics
from processor.privacy import PrivacyPlan
from processor.spec_task import SpecTask, load_task
from processor.task_spec import MAX_SPEC_BYTES
from processor.tasks import Task
from processor.training import TrainingSettings

log = logging.getLogger("client")
# A secure round's masked update is published only this long before the deadline or earlier: one
# published later could miss it, and would then lie on IPFS as a dropout's.
PUBLISH_MARGIN_SECONDS = 2.0


class WrongNetwork(ActionError):
    """The organization's network learns another task than this device was started for."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 409)


def scene_of(current: chain.ClientRound | None, chain_ok: bool = True) -> str:
    """What a device's page shows changes with: the round, its phase and this client's part in it.
    A message about an earlier scene (a failed action) no longer applies in a new one."""
    if not chain_ok:
        return "chain-down"
    if current is None or current.round_id == 0:
        return "no-round"
    return f"{current.round_id}:{'open' if current.open else 'closed'}:" \
           f"{'submitted' if current.submitted else 'not-submitted'}"


@dataclass(frozen=True)
class ClientConfig:
    client_id: int = 0
    num_clients: int = 2
    task: str = "mnist"  # a built-in task's name, a task spec file, or the CID the organization published a spec under
    partition: str = "iid"  # iid, dirichlet, skewed, by-user
    alpha: float = 0.5
    seed: int = 0
    data_path: Path | None = None  # the device's own data (processor.device_data); None: a bundled partition
    key: str | None = None  # private key; default: chain.client_key(client_id)
    agent: bool = False  # take part in every round by itself (client.agent); False: only when asked
    train_delay: float = 0.0  # seconds added to every round's training: a slow device, for demos and tests


@dataclass
class PulledBase:
    round_id: int
    cid: str
    weights: dict
    fisher: dict
    plan: TrainingSettings  # how the organization asks this round's clients to train
    privacy: PrivacyPlan  # how they privatize their deltas
    curvature: RoundCurvature | None  # FedCurv: the statistics of the last merged round's clients


@dataclass
class TrainedUpdate:
    round_id: int
    base_cid: str
    plan: TrainingSettings  # the plan it was trained by
    result: rounds.LocalResult  # its delta privatized by the round's privacy plan
    evaluation: Evaluation | None  # the base on this device's held-out data


@dataclass(frozen=True)
class DeviceData:
    """A device's task and its rows (x, y): its own file checked against the task, or its partition."""
    task: Task
    x: np.ndarray
    y: np.ndarray


def read_device(config: ClientConfig, task: Task | None = None,
                fetch: Callable[[str], bytes] | None = None) -> DeviceData:
    """The device's task (`task`, else the one `config` names) and its rows. `fetch` gets a spec
    named by its CID; a task given by name or file needs neither the chain nor IPFS, so a wrong
    data file is said at once."""
    task = task or load_task(config.task, fetch=fetch)
    if config.data_path is not None:
        return DeviceData(task, *task.read_device_data(config.data_path))
    if isinstance(task, SpecTask):
        raise DeviceDataError(f"the task spec {task.name!r} is learned from the device's own data file: "
                              "give it (--data FILE)")
    return DeviceData(task, *task.client_data(config.client_id, config.num_clients, scheme=config.partition,
                                              seed=config.seed, alpha=config.alpha))


def spec_fetcher(store: ipfs.ContentStore) -> Callable[[str], bytes]:
    """Gets a spec published on IPFS by its CID, checked against it and no larger than a spec may be."""
    return lambda cid: store.get(cid, max_bytes=MAX_SPEC_BYTES)


class ClientService:
    def __init__(self, settings: Settings, config: ClientConfig, w3, store: ipfs.ContentStore,
                 registry: chain.Registry | None = None,
                 round_facts: secure_round.RoundFacts | None = None, device: DeviceData | None = None) -> None:
        self.settings = settings
        self.config = config
        # a spec published on IPFS is fetched by its CID, checked against it
        device = device or read_device(config, fetch=spec_fetcher(store))
        self.task, x, y = device.task, device.x, device.y
        self.w3 = w3
        self.store = store
        self._registry = registry
        self.key = config.key or chain.client_key(config.client_id)
        self.address = Account.from_key(self.key).address
        # A share of the samples never trains: each round's base is evaluated on it (federated evaluation).
        train, held_out = self.task.device_holdout(x, seed=config.seed + config.client_id)
        self.x, self.y, self.x_eval, self.y_eval = x[train], y[train], x[held_out], y[held_out]
        self.private_path = settings.state_dir / "client" / self.address / "private.safetensors"
        self.private = self._load_private()
        self.base: PulledBase | None = None
        self.trained: TrainedUpdate | None = None
        self.last_tx: dict[str, Any] | None = None
        self.sent: dict[int, SentStatistics] = {}  # FedCurv: what it sent to its latest rounds, by round
        self._lock = threading.Lock()  # pull/train/publish change shared state one at a time
        self.agent = None  # the ClientAgent, when this device takes part by itself
        self.secure_party: secure_round.SecureParty | None = None  # its secrets in the current secure round
        self.encryption = secure_round.encryption_key_pair(self.key)  # what secret shares are sealed to
        # what a secure round's devices read alike (a group's devices share one)
        self.round_facts = round_facts or secure_round.RoundFacts()

    def _load_private(self) -> dict:
        """The private tensors this device saved, or zero ones (users it has not trained yet) when
        it has none, or none that fit this task's model."""
        if not self.task.private_spec or not self.private_path.exists():
            return self.task.initial_private()
        try:
            return codec.decode_private(self.task, self.private_path.read_bytes())
        except codec.CodecError as exc:
            log.warning("client %d: starting its users' state afresh: %s does not fit (%s)",
                        self.config.client_id, self.private_path, exc)
            return self.task.initial_private()

    def _keep_private(self, private: dict) -> None:
        """Keep the private tensors for the next round, on disk too (replaced whole, never half-written)."""
        self.private = private
        if private:
            write_atomically(self.private_path, codec.encode_private(self.task, private))

    @property
    def registry(self) -> chain.Registry:
        if self._registry is None:  # the organization may deploy after this client started
            self._registry = find_registry(self.w3, self.settings)
        if self._registry is None:
            raise ActionError("no contract is deployed on this chain yet", 409)
        return self._registry

    # ---- state -------------------------------------------------------------------------

    def data_summary(self) -> dict[str, Any]:
        source = str(self.config.data_path) if self.config.data_path else f"{self.config.partition} partition"
        summary = {"samples": int(len(self.y)), "held_out": int(len(self.y_eval)), "source": source}
        if self.task.numeric_label:  # the spread a model's RMSE is worth beside
            spread = float(np.std(self.y) * self.task.document.label.std)  # the rows hold the label standardized
            return {**summary, "label_counts": {}, "majority": None, "label_std": spread}
        labels, counts = np.unique(self.y, return_counts=True)
        return {**summary, "majority": majority_baseline(self.y),
                "label_counts": {str(int(label)): int(count) for label, count in zip(labels, counts)}}

    def open_round(self) -> chain.ClientRound:
        """The open round as this client sees it (one chain call); 409 when none is open."""
        registry = self.registry
        opened = retrying(self.settings, "reading the current round", lambda: registry.current_round_for(self.address))
        if opened.round_id == 0:
            raise ActionError("no round has started yet", 409)
        return opened

    def _unsubmitted_round(self) -> chain.ClientRound:
        opened = self.open_round()
        if opened.submitted:
            raise ActionError(f"this client has already submitted to round {opened.round_id}", 409)
        if not opened.open:
            raise ActionError(f"round {opened.round_id} is closed to submissions: the organization is merging it",
                              409)
        return opened

    def status(self) -> dict[str, Any]:
        """Everything the device's page and API show; an outage is described, never raised."""
        status: dict[str, Any] = {
            "client_id": self.config.client_id, "address": self.address, "task": self.task.name,
            "partition": self.config.partition, "data": self.data_summary(),
            "plan": asdict(self.base.plan) if self.base else None,
            "privacy": self.base.privacy.describe() if self.base else None,
            "base": {"round": self.base.round_id, "cid": self.base.cid} if self.base else None,
            "trained": self._trained_view(), "last_tx": self.last_tx, "round": None, "chain_error": None,
            "contract": None, "enrolled": None, "ipfs": store_status(self.store, self.settings.ipfs_api),
            "agent": self.agent.status() if self.agent else None,
        }
        current = None
        try:
            registry = self.registry
            status["contract"] = registry.address
            current = registry.current_round_for(self.address)
            enrolled = registry.open_enrolment or registry.is_client(self.address)
            status["enrolled"] = enrolled
            if current.round_id:
                status["round"] = {"round": current.round_id, "base_cid": current.base_cid,
                                   "open": current.open, "submitted": current.submitted,
                                   "invited": current.invited, "deadline": current.deadline,
                                   "deadline_text": deadline_text(current.deadline), "enrolled": enrolled}
        except ActionError:  # no contract yet: the organization deploys it
            pass
        except Exception as exc:  # an outage is shown, not raised: the page must still render
            status["chain_error"] = outage_text("chain", self.settings.chain_url, exc)
        status["scene"] = scene_of(current, status["chain_error"] is None)
        return status

    def scene(self) -> str:
        """The scene of this device's page now (one chain call): see scene_of."""
        try:
            return scene_of(self.registry.current_round_for(self.address))
        except ActionError:  # no contract yet
            return scene_of(None)
        except Exception:  # an outage
            return scene_of(None, chain_ok=False)

    def _trained_view(self) -> dict[str, Any] | None:
        if self.trained is None:
            return None
        result = self.trained.result
        evaluation = self.trained.evaluation
        metric = self.task.headline  # accuracy, or a numeric label's RMSE
        return {"round": self.trained.round_id, "num_samples": result.num_samples, "metric": metric,
                "before": result.metrics_before[metric], "after": result.metrics_after[metric],
                "held_out": getattr(evaluation, metric) if evaluation else None}

    # ---- actions -----------------------------------------------------------------------

    def pull(self, timer: PhaseTimer | None = None, opened: chain.ClientRound | None = None) -> dict[str, Any]:
        timer = timer or PhaseTimer()
        with self._lock:
            with timer.phase("chain"):
                opened = opened or self.open_round()
            if self.base is None or self.base.cid != opened.base_cid:
                with timer.phase("ipfs"):
                    data = retrying(self.settings, f"fetching the base {opened.base_cid}",
                                    lambda: self.store.get(opened.base_cid))
                with timer.phase("decoding"):
                    self._check_task(data, opened.base_cid)
                    try:
                        weights, fisher, metadata, curvature = codec.decode_model(self.task, data)
                        plan, privacy_plan = codec.training_plan(metadata), codec.privacy_plan(metadata)
                    except codec.CodecError as exc:
                        raise ActionError(f"the base model {opened.base_cid} cannot be used: {exc}", 502) from None
                self.base = PulledBase(opened.round_id, opened.base_cid, weights, fisher, plan, privacy_plan,
                                       curvature)
            self.base.round_id = opened.round_id
            return {"round": opened.round_id, "base_cid": opened.base_cid, "seconds": timer.as_dict()}

    def _check_task(self, base: bytes, cid: str) -> None:
        """Refuse a base model of another task than this device's, saying which task the network
        runs: a built-in one by its name, a task spec by the CID it is published under."""
        try:
            metadata = codec.read_header(base)[1]
        except codec.CodecError:
            return  # decoding the base says what is wrong with it
        task, spec_cid = metadata.get("task"), metadata.get("task_spec")
        spec_differs = (spec_cid is not None or isinstance(self.task, SpecTask)) and \
            metadata.get("arch") != self.task.arch_id
        if task is not None and (task != self.task.name or spec_differs):
            learned = f"the task spec {spec_cid} ('{task}')" if spec_cid else f"the task '{task}'"
            raise WrongNetwork(f"the organization's rounds learn {learned} (base model {cid}), but this client was "
                               f"started for '{self.task.name}': start it with --task {spec_cid or task}")

    def check_network(self) -> None:
        """At start-up: refuse to join a network whose current round learns another task. When the
        chain, the contract or IPFS cannot tell yet, the first pull checks it."""
        try:
            opened = self.registry.current_round_for(self.address)
            if opened.round_id:
                self._check_task(self.store.get(opened.base_cid, timeout=self.settings.timeout), opened.base_cid)
        except WrongNetwork:
            raise
        except Exception as exc:  # an outage or no contract yet: nothing to check against now
            log.info("the network's task is not known yet (%s); the first pull checks it", describe_error(exc))

    def train(self, job: Job | None = None, timer: PhaseTimer | None = None) -> dict[str, Any]:
        timer = timer or PhaseTimer()
        with self._lock:
            if self.base is None:
                raise ActionError("pull the base model first", 409)
            cfg = self.config

            def progress(report: dict) -> None:
                if job is not None:
                    job.progress = {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}
                if "loss" in report:  # an epoch's end
                    log.info("client %d: epoch %d/%d, loss %.4f", cfg.client_id, report["epoch"], report["epochs"],
                             report["loss"])

            with timer.phase("evaluation"):
                evaluation = (Evaluation.of(self.task.evaluate(self.base.weights, self.x_eval, self.y_eval,
                                                               self.private), len(self.y_eval))
                              if len(self.y_eval) and self.base.privacy.publishes_evaluation else None)
            self._check_privacy_budget()
            others = self._fedcurv_pull()
            if cfg.train_delay:
                time.sleep(cfg.train_delay)
            with timer.phase("training"):
                result = rounds.local_update(
                    self.task, self.base.weights, self.base.fisher, self.x, self.y, self.base.plan,
                    seed=cfg.seed + 1000 * self.base.round_id + cfg.client_id, progress=progress,
                    private=self.private, others=others)
                self._keep_private(result.private)
            with timer.phase("privacy"):
                result = self.privatized(result)
            self.trained = TrainedUpdate(self.base.round_id, self.base.cid, self.base.plan, result, evaluation)
            return {**self._trained_view(), "seconds": timer.as_dict()}

    def _fedcurv_pull(self) -> Curvature | None:
        """In a FedCurv round, the other clients' statistics of the last merged round (None before
        any); refused in a private round, where this device's Fisher would go out uncovered."""
        if self.base.plan.regularizer != "fedcurv":
            return None
        try:
            self.base.privacy.refuse_regularizer(self.base.plan.regularizer)
        except ValueError as exc:
            raise ActionError(f"this device does not take part in round {self.base.round_id}: {exc}", 409) from None
        published = self.base.curvature
        return penalty.others_for(published, self.address, self.sent.get(published.round_id) if published else None)

    def _check_privacy_budget(self) -> None:
        """Refuse to train for a round whose update would spend more than the plan's epsilon budget:
        this device's privacy is spent by publishing, whatever the organization does next."""
        plan, round_id = self.base.privacy, self.base.round_id
        if plan.epsilon_budget and privacy.epsilon_spent(round_id, plan) > plan.epsilon_budget:
            raise ActionError(f"the privacy budget is spent: an update to round {round_id} would take epsilon to "
                              f"{privacy.epsilon_spent(round_id, plan):.2f}, above the plan's budget of "
                              f"{plan.epsilon_budget:g} (delta {plan.delta:g})", 409)

    def privatized(self, result: rounds.LocalResult) -> rounds.LocalResult:
        """`result` with its delta as it may leave this device: clipped and noised by the round's
        privacy plan (unchanged without one)."""
        return replace(result, delta=privacy.privatize(result.delta, self.base.privacy))

    def publish(self, timer: PhaseTimer | None = None, opened: chain.ClientRound | None = None) -> dict[str, Any]:
        """Publish the trained update. `opened`: the round as participate already read and checked it
        (the contract still refuses a second submission)."""
        timer = timer or PhaseTimer()
        with self._lock:
            if self.trained is None:
                raise ActionError("train on the local data first", 409)
            with timer.phase("chain"):
                opened = opened or self._unsubmitted_round()
            round_id = opened.round_id
            if opened.base_cid != self.trained.base_cid:
                raise ActionError(f"the trained update is for an older base model; round {round_id} "
                                  f"starts from {opened.base_cid}: pull and train again", 409)
            result = self.trained.result
            reported = self.base.privacy.reported_samples(result.num_samples)
            with timer.phase("encoding"):
                data = codec.encode_delta(self.task, result.delta, round_id=round_id, base_cid=opened.base_cid,
                                          num_samples=reported, client=self.address,
                                          dtype=self.trained.plan.update_dtype, evaluation=self.trained.evaluation,
                                          fisher=result.fisher)
            submitted = self._submit(data, round_id, reported, timer)
            if result.fisher is not None:  # its part of the round's statistics, as the organization decodes it
                sent = codec.decode_delta(self.task, data, with_fisher=True)
                latest = max(self.sent, default=None)  # kept too: a restarted round's base sums an older one
                self.sent = {r: s for r, s in self.sent.items() if r == latest}
                self.sent[round_id] = SentStatistics(round_id, self.base.weights, sent.delta, sent.fisher)
            return {**submitted, "seconds": timer.as_dict()}

    def _submit(self, data: bytes, round_id: int, num_samples: int, timer: PhaseTimer, masked: bool = False) -> dict:
        """Add the encoded update to IPFS and submit its CID to round `round_id` (under the lock)."""
        with timer.phase("ipfs"):
            cid = retrying(self.settings, "adding the update to IPFS", lambda: self.store.add(data))
        with timer.phase("chain"):
            tx = self.registry.submit_update(self.key, round_id, cid, num_samples)
        self.last_tx = {"action": "submitUpdate", "round": round_id, "cid": cid, "tx": tx.tx_hash,
                        "gas": tx.gas_used, "bytes": len(data), **({"masked": True} if masked else {})}
        log.info("client %d: published %s%s (%d bytes) to round %d", self.config.client_id,
                 "the masked update " if masked else "", cid, len(data), round_id)
        return self.last_tx

    def participate(self, job: Job | None = None, opened: chain.ClientRound | None = None,
                    resumed: bool = False) -> dict[str, Any]:
        """Pull, train and publish; a failure at any step publishes nothing. `opened`: the round as
        the caller just read it, open and not yet submitted to (the contract still refuses a second
        submission). In a secure round, take its stages as far as they can go now: the result
        says what it waits for ("waiting") or why this client is left out ("left_out"); `resumed`
        (the step its last result said to take at once): training is then a step of its own."""
        timer = PhaseTimer()
        with timer.phase("chain"):  # read once for all three steps
            opened = opened or self._unsubmitted_round()
        if job is not None:
            job.step = "pull"
        self.pull(timer, opened)
        if self.base.privacy.secure_aggregation:
            return {**self._secure_step(job, timer, opened, resumed), "seconds": timer.as_dict()}
        for step, action in (("train", lambda: self.train(job, timer)), ("publish", lambda: self.publish(timer, opened))):
            if job is not None:
                job.step = step
            result = action()
        return {**result, **(self._trained_view() or {}), "seconds": timer.as_dict()}

    def _secure_step(self, job: Job | None, timer: PhaseTimer, opened: chain.ClientRound,
                     resumed: bool) -> dict[str, Any]:
        registry, me, round_id = self.registry, self.address, opened.round_id
        party = self.secure_party
        if party is None or (party.round_id, party.base_cid) != (round_id, opened.base_cid):
            party = self.secure_party = secure_round.SecureParty(round_id, opened.base_cid, self.encryption)
        plan = self.base.privacy
        with timer.phase("chain"):
            if party.info is None:  # read once: where the round's messages start, and who it invites
                party.info, party.holders = self.round_facts.of(registry, round_id, plan.threshold)
            view = self.round_facts.view(registry, party.info)
        shared, posted = me in view.shares, False
        if me not in view.keys:
            if job is not None:
                job.step = "keys"
            holders = secure_round.share_holders(party, view)
            with timer.phase("ipfs"):  # sharing at once (no key roster): keys and shares in one message
                cid = secure_round.add_shares(registry, self.store, me, party, holders, plan.threshold) \
                    if holders else None
            with timer.phase("chain"):
                secure_round.post_keys(registry, self.key, party, cid)
            shared, posted = cid is not None, True
        elif view.keys[me].mask != party.mask.public:
            return {"round": round_id, "left_out": "this client's keys for the round are not the ones it holds "
                                                   "(it restarted after posting them)"}
        problem = secure_round.roster_problem(view, me, plan.threshold)
        if problem:
            return {"round": round_id, "left_out": problem}
        if not shared:
            holders = secure_round.share_holders(party, view)
            if not holders:
                return {"round": round_id, "waiting": "the organization's key roster"}
            if job is not None:
                job.step = "shares"
            with timer.phase("ipfs"):
                cid = secure_round.add_shares(registry, self.store, me, party, holders, plan.threshold)
            with timer.phase("chain"):
                registry.post_round_message(self.key, round_id, chain.MessageKind.SHARES, cid.encode())
            posted = True
        # Trained once its shares are out, while the others' come in: a device too slow to submit by
        # the deadline is then a dropout the others' shares recover, not one that holds up the rosters.
        # Posting, training and (when resumed) publishing are steps of their own, taken at the
        # device's next turn (`resume`): training takes turns on the process's one model, the other
        # steps wait for IPFS and the chain, and the agents' watcher overlaps the two kinds.
        if not self.trained_for(opened):
            if posted:
                return {"round": round_id, "waiting": "its turn to train (its messages are out)", "resume": True}
            if job is not None:
                job.step = "train"
            self.train(job, timer)
            if resumed:
                return {"round": round_id, "waiting": "its turn to publish (it has trained)", "resume": True}
            with timer.phase("chain"):  # the mask roster may have come meanwhile
                view = self.round_facts.view(registry, party.info)
            problem = secure_round.roster_problem(view, me, plan.threshold)
            if problem:
                return {"round": round_id, "left_out": problem}
        if view.mask_roster is None:
            return {"round": round_id, "waiting": "the organization's mask roster"}
        with timer.phase("chain"):
            closed = self._closed_before_publishing(round_id)
        if closed:  # a masked update published now would only be counted as a dropout's
            return {"round": round_id, "left_out": closed}
        if job is not None:
            job.step = "publish"
        with self._lock:
            result = self.trained.result
            with timer.phase("encoding"):  # the delta is privatized already (train)
                data = secure_round.masked_update(registry, self.task, party, me, view, result.delta,
                                                  secure_sum.quantization_bound(plan), result.num_samples,
                                                  plan.secure_groups, plan.threshold)
            submitted = self._submit(data, round_id, plan.reported_samples(result.num_samples), timer, masked=True)
            party.submitted = True
        return {**submitted, **(self._trained_view() or {})}

    def trained_for(self, opened: chain.ClientRound) -> bool:
        """Whether this device holds its trained update for round `opened` (from its base)."""
        return self.trained is not None and (self.trained.round_id, self.trained.base_cid) == (opened.round_id,
                                                                                               opened.base_cid)

    def _closed_before_publishing(self, round_id: int) -> str | None:
        """Why this client must not publish its masked update now (None when it may): the round
        closed, or its deadline is too near for the transaction to be mined before it. Looked at
        before anything reaches IPFS: nothing of a round is published once it is over."""
        info = self.registry.round(round_id)
        if info.closed:
            return "the round closed before this client could submit: it publishes nothing"
        if info.deadline and time.time() + PUBLISH_MARGIN_SECONDS > info.deadline:
            return (f"the round's deadline is less than {PUBLISH_MARGIN_SECONDS:g} s away: this client publishes "
                    "nothing, its update would come too late")
        return None

    def after_closing(self, round_id: int) -> dict[str, Any]:
        """After a secure round this client submitted to has closed: unmask once the unmask roster
        is out (its seed, and its pairwise keys with its group's dropped clients), and reveal its
        shares of the secrets the recovery roster names, once it is out."""
        party = self.secure_party
        if party is None or party.round_id != round_id or not party.submitted:
            raise ActionError(f"this client holds no secrets of round {round_id} to reveal", 409)
        registry = self.registry
        # read once for the process's devices; the contract refuses an unmask outside the stage anyway
        view, submitted = self.round_facts.after_closing(registry, party.info, need_recovery=party.unmasked)
        if view.unmask_roster is None:
            return {"round": round_id}
        plan = self.base.privacy
        done: dict[str, Any] = {"round": round_id}
        try:
            if not party.unmasked:
                done["unmasked_for"] = secure_round.unmask(registry, self.key, self.address, party, view, submitted,
                                                           plan.secure_groups, plan.threshold)
            if view.recovery_roster is not None and party.unmasked and not party.revealed:
                done["revealed_for"] = secure_round.reveal(registry, self.store, self.key, self.address, party,
                                                           view, self.settings.timeout)
        except ValueError as exc:  # a roster that does not hold: this client reveals nothing of it
            raise ActionError(f"round {round_id}: {exc}", 409) from exc
        return done


# The actions a device's page and API both offer: name -> what the job does with the service.
ACTIONS: dict[str, Callable[[ClientService, Job | None], dict[str, Any]]] = {
    "pull": lambda service, job: service.pull(),
    "train": lambda service, job: service.train(job),
    "publish": lambda service, job: service.publish(),
    "participate": lambda service, job: service.participate(job),
}
