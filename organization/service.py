"""The organization's side of a round: publish the base model, validate and merge the clients' deltas.

The chain is the source of truth for rounds; `history.json` only caches what the organization
measured (accuracy, validation verdicts), so a restarted organization carries on from the chain.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account

from infra import chain, ipfs
from infra.settings import Settings
from infra.webapp import (
    ActionError,
    PhaseTimer,
    deadline_text,
    describe_error,
    find_registry,
    outage_text,
    retrying,
    store_status,
)
from infra.secure_round import MAX_FILE_BYTES as MAX_REVEAL_BYTES
from infra.secure_round import SecureRoundView, keys_before
from organization import secure_round
from organization.guide import organization_guide
from processor import codec, privacy, rounds
from processor.evaluation import weighted_mean
from processor.penalty import RoundCurvature
from processor.privacy import PrivacyPlan
from processor.screen import MergePolicy, Received, RoundMerge, merge_round
from processor.spec_task import SpecTask, load_task
from processor.tasks import Task
from processor.training import TrainingSettings

log = logging.getLogger("organization")
# Updates fetched at once. Content no node holds costs a fetch its whole timeout, so this many
# absent CIDs cost one timeout together, and the round's fetches end within two (FETCH_DEADLINES).
FETCH_WORKERS = 64
FETCH_DEADLINES = 2
# Updates fetched ahead of their round's merge, as their submissions are pushed (organization.runner):
# at most this many are held, a round's worth (the merge holds them all in memory anyway).
PREFETCH_LIMIT = 256


@dataclass(frozen=True)
class OrganizationConfig:
    task: str = "mnist"  # a built-in task's name, or a task spec file (processor.spec_task.load_task)
    held_out: Path | None = None  # with a task spec: the organization's own rows of its columns, its test set
    seed: int = 0
    pretrain_epochs: int = 0  # 0 = random initial model; >0 = pretrained on the organization's own data
    training: TrainingSettings = field(default_factory=TrainingSettings)  # the plan every client trains by
    merge: MergePolicy = field(default_factory=MergePolicy)  # how updates are checked, bounded and merged
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)  # how every client privatizes its delta
    max_update_bytes: int = 64 * 1024 * 1024
    fetch_timeout: float | None = None  # seconds to wait for one update (None: FL_TIMEOUT); then it is rejected
    open_enrolment: bool = False
    max_samples: int = chain.DEFAULT_MAX_SAMPLES  # the contract's cap on a submission's sample count
    rules: chain.RoundRules = field(default_factory=chain.RoundRules)  # every round's deadline, quorum, invitations
    rounds: int = 0  # rounds to run by itself (organization.runner); 0: only when asked (buttons, API)
    # a secure round's key and share stages end when every client expected has posted, or after this
    # long; so does its wait for the dropped clients' revealed shares
    stage_seconds: float = 10.0
    target_accuracy: float | None = None  # running by itself, stop once the merged model's test accuracy reaches it

    def __post_init__(self) -> None:
        self.privacy.refuse_regularizer(self.training.regularizer)


class RoundWaiting(ActionError):
    """The round cannot be merged yet: a secure round's unmasking stages are under way. `messages`:
    the client messages it waits for at least (None: unknown); `ends_at`: when its stage ends
    regardless (unix seconds, 0: none)."""

    def __init__(self, message: str, messages: int | None = None, ends_at: float = 0.0) -> None:
        super().__init__(message, 409)
        self.messages = messages
        self.ends_at = ends_at


def history_path(state_dir: Path, registry_address: str) -> Path:
    """Where the organization keeps what it measured of the rounds of the registry at that address."""
    return state_dir / "organization" / registry_address / "history.json"


def refuse_what_cannot_run(task: Task, config: OrganizationConfig) -> None:
    """ValueError for settings the task cannot honour, said at start rather than in a round."""
    if task.numeric_label and config.target_accuracy is not None:
        raise ValueError(f"the task {task.name!r} predicts a number: it has no accuracy to stop at")
    if config.target_accuracy is not None and not task.has_test_set:
        raise ValueError("a target accuracy is measured on the organization's test set: give one (--test-data)")
    if isinstance(task, SpecTask) and config.pretrain_epochs > 0:
        raise ValueError("the organization's rows of a task spec are its test set: it never trains on them "
                         "(leave out --pretrain-epochs)")
    plan = config.training
    if not task.has_test_set and plan.regularizer == "ewc" and plan.ewc_lambda > 0:
        raise ValueError("EWC anchors on the Fisher of the organization's own rows, and it holds none: give a "
                         "test set (--test-data), or pull with --regularizer fedprox or fedcurv")


class OrganizationService:
    def __init__(
        self,
        settings: Settings,
        config: OrganizationConfig,
        w3,
        store: ipfs.ContentStore,
        registry: chain.Registry | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.task = load_task(config.task, config.held_out)
        refuse_what_cannot_run(self.task, config)
        self.w3 = w3
        self.store = store
        self.key = settings.org_key or chain.DEV_KEYS[0]
        self.address = Account.from_key(self.key).address
        self.registry = registry or find_registry(w3, settings)
        self._lock = threading.Lock()  # one round-moving action at a time
        self._published: tuple[str, dict] | None = None  # (CID, weights) of the last model this process published
        self._spec_cid: str | None = None  # where this process published its task's spec
        self._rules_checked = False  # whether the chain's round rules are known to be the configured ones
        self._enrolment = chain.EnrolmentLog()  # who may take part from which round, from the chain's events
        self._invited: dict[int, list[str] | None] = {}  # the open round's invited clients, drawn once
        self._prefetched: dict[str, Future] = {}  # CID -> its verified bytes, fetched ahead of the merge
        self._prefetch_lock = threading.Lock()
        self._prefetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefetch")
        self.runner = None  # the RoundRunner, when this organization runs the rounds by itself
        self.clock = time.time  # what deadlines are compared with: a node's blocks carry the wall-clock time
        self._received: dict[int, list[Received]] = {}  # a secure round's updates, fetched once for its unmasking
        # a secure round's number, who posted keys in the round before it, and who is barred from it
        self._roster_facts: tuple[int, set[str], set[str]] = (0, set(), set())

    # ---- state -------------------------------------------------------------------------

    def require_registry(self) -> chain.Registry:
        if self.registry is None:
            raise ActionError("no contract is deployed on this chain yet: deploy it first", 409)
        return self.registry

    @property
    def history_path(self) -> Path:
        return history_path(self.settings.state_dir, self.registry.address if self.registry else "undeployed")

    def history(self) -> dict[str, Any]:
        try:
            return json.loads(self.history_path.read_text())
        except (OSError, ValueError):
            return {"initial": None, "rounds": {}}

    def _save_history(self, history: dict[str, Any]) -> None:
        ipfs.write_atomically(self.history_path, json.dumps(history, indent=1).encode())

    def chain_status(self) -> dict[str, Any]:
        try:
            return {"ok": True, "url": self.settings.chain_url, "chain_id": self.w3.eth.chain_id,
                    "block": self.w3.eth.block_number}
        except Exception as exc:
            return {"ok": False, "url": self.settings.chain_url,
                    "error": outage_text("chain", self.settings.chain_url, exc)}

    def ipfs_status(self) -> dict[str, Any]:
        return store_status(self.store, self.settings.ipfs_api)

    @functools.cached_property
    def baseline(self) -> dict[str, Any] | None:
        """The test set's trivial baseline; None without a test set."""
        return self.task.baseline() if self.task.has_test_set else None

    @staticmethod
    def _started_round(registry: chain.Registry, round_id: int) -> chain.RoundInfo:
        """Round `round_id`'s record on chain; 404 for a round that has not started."""
        info = registry.round(round_id) if 1 <= round_id <= chain.MAX_ROUND else None
        if info is None or info.start_block == 0:
            raise ActionError(f"round {round_id} does not exist", 404)
        return info

    def round_view(self, round_id: int) -> dict[str, Any]:
        registry = self.require_registry()
        info = self._started_round(registry, round_id)
        result = self.history()["rounds"].get(str(round_id))
        verdicts = (result or {}).get("verdicts", {})
        submissions = [
            {"client": sub.client, "cid": sub.cid, "num_samples": sub.num_samples,
             "gateway": self.store.gateway_url(sub.cid), "verdict": verdicts.get(sub.client)}
            for sub in registry.logged_submissions(info)
        ]
        return {
            "round": round_id, "base_cid": info.base_cid, "model_cid": info.model_cid,
            "closed": info.closed, "finalized": info.finalized, "submission_count": info.submissions,
            "expected": None if info.finalized else self.expected_submissions(info),
            "invited": None if info.finalized else self.invited_clients(info),
            "quorum": info.quorum, "deadline": info.deadline, "deadline_text": deadline_text(info.deadline),
            "invited_share": info.invited_share,
            "missed": not info.finalized and info.submissions < info.quorum and info.past_deadline(self.clock()),
            "base_gateway": self.store.gateway_url(info.base_cid), "submissions": submissions,
            "result": result,
        }

    def expected_submissions(self, info: chain.RoundInfo) -> int | None:
        """How many clients round `info` invites; None under open enrolment, where anyone may take part.
        A secure round expects the clients of its mask roster (None until it is posted)."""
        if self.config.privacy.secure_aggregation:
            roster = SecureRoundView.of(self.require_registry(), info).mask_roster
            return None if roster is None else len(roster)
        invited = self.invited_clients(info)
        return None if invited is None else len(invited)

    def advance_secure_round(self, info: chain.RoundInfo) -> secure_round.StageWait:
        """Post the open secure round's next roster when its stage is over; what the round waits for."""
        invited = self.invited_clients(info)
        if invited is None:
            raise ActionError("secure aggregation needs the allowlist: under open enrolment no roster of "
                              "expected clients exists", 409)
        registry = self.require_registry()
        if self._roster_facts[0] != info.round_id:  # read once a round
            self._roster_facts = (info.round_id, set(keys_before(registry, info.round_id)),
                                  self.barred_clients(info.round_id))
        _, previously_keyed, barred = self._roster_facts
        with self._lock:
            return secure_round.post_rosters(registry, self.key, info, invited, previously_keyed,
                                             self.config.privacy.threshold, self.config.stage_seconds, self.clock(),
                                             barred)

    def invited_clients(self, info: chain.RoundInfo) -> list[str] | None:
        """The clients round `info` invites: enrolled before it opened and drawn by its seed; None
        under open enrolment."""
        if info.round_id not in self._invited:  # fixed once the round opened: later enrolments wait for the next
            clients = self.enrolled_clients(info.round_id)
            self._invited = {info.round_id: None if clients is None else
                             [client for client in clients if info.invites(client)]}
        return self._invited[info.round_id]

    def enrolled_clients(self, round_id: int) -> list[str] | None:
        """The clients enrolled in time for round `round_id`; None under open enrolment."""
        registry = self.require_registry()
        if registry.open_enrolment:
            return None
        self._enrolment.update(registry)
        return self._enrolment.clients_for(round_id)

    def status(self) -> dict[str, Any]:
        """Everything the dashboard and /api/status show, with the checklist and next step; an
        outage is described in words, never raised."""
        chain_state = self.chain_status()
        status: dict[str, Any] = {
            "task": self.task.name, "metric": self.task.headline, "organization": self.address, "chain": chain_state,
            "ipfs": self.ipfs_status(), "contract": None, "current_round": None, "previous_round": None,
            "clients": None, "history": self.accuracy_history(), "baseline": self.baseline,
            "runner": self.runner.status() if self.runner else None,
            "privacy": {**asdict(self.config.privacy), "description": self.config.privacy.describe()},
        }
        if self.registry is not None:
            status["contract"] = {"address": self.registry.address}
        if self.registry is not None and chain_state["ok"]:
            try:
                status.update(self._chain_status(self.registry))
            except Exception as exc:  # the chain went away while it was read
                status["chain"] = {**chain_state, "ok": False,
                                   "error": outage_text("chain", self.settings.chain_url, exc)}
        status["guide"] = organization_guide(status)
        return status

    def _chain_status(self, registry: chain.Registry) -> dict[str, Any]:
        """The contract's rules, the current and previous rounds, and the enrolled clients."""
        found: dict[str, Any] = {"contract": {"address": registry.address, "open_enrolment": registry.open_enrolment,
                                              "rules": asdict(registry.round_rules())}}
        current = registry.current_round()
        if current:
            found["current_round"] = self.round_view(current)
        if current > 1:  # its verdicts say why updates were left out of the model in use now
            found["previous_round"] = self.round_view(current - 1)
        found["clients"] = self.clients_view(found.get("current_round"))
        return found

    def clients_view(self, current_round: dict[str, Any] | None) -> list[dict[str, Any]] | None:
        """Each enrolled client: the round it takes part from, whether the open round invites it and
        has its update, and the verdict on its latest merged update. None under open enrolment."""
        enrolled = self.enrolled_clients(current_round["round"] + 1 if current_round else 1)
        if enrolled is None:
            return None
        last: dict[str, dict[str, Any]] = {}
        rounds_measured = self.history()["rounds"]
        for key in sorted(rounds_measured, key=int):
            for client, verdict in rounds_measured[key].get("verdicts", {}).items():
                last[client] = {"round": int(key), **verdict}
        submitted = {sub["client"] for sub in current_round["submissions"]} if current_round else set()
        invited = current_round.get("invited") if current_round else None
        return [{"address": client, "from_round": self._enrolment.from_round(client),
                 "invited": invited is not None and client in invited,
                 "submitted": client in submitted, "last_verdict": last.get(client)}
                for client in enrolled]

    def accuracy_history(self) -> list[dict[str, Any]]:
        """Test metrics of the initial model (round 0) and of each round's merged model (with its CID:
        `run.py score` and `run.py export` take it, or the round), with the federated evaluation of
        each (the clients' held-out data, reported in the next round)."""
        history = self.history()
        points = [{"round": 0, **history["initial"]}] if history["initial"] else []
        for key in sorted(history["rounds"], key=int):
            entry = history["rounds"][key]
            missed = entry.get("missed_quorum", False)
            points.append({"round": int(key), **entry["metrics"], "missed_quorum": missed,
                           "merged": not missed and entry.get("accepted", 0) > 0, "model_cid": entry.get("model_cid"),
                           "federated": entry.get("federated"), "epsilon": entry.get("epsilon")})
        return points

    def epsilon_after(self, round_id: int) -> float | None:
        """Epsilon spent, at the privacy plan's delta, once round `round_id`'s updates are out: every
        round so far counts, a restarted one too (its updates were published all the same); None
        when the rounds are not differentially private."""
        plan = self.config.privacy
        return privacy.epsilon_spent(round_id, plan) if plan.is_dp else None

    def evaluate_on_test(self, weights) -> dict[str, float]:
        """The model's metrics on the organization's test set; none without one."""
        if not self.task.has_test_set:
            return {}
        data = self.task.data()
        return self.task.evaluate(weights, data.x_test, data.y_test)

    # ---- actions -----------------------------------------------------------------------

    def deploy(self) -> str:
        with self._lock:
            if self.registry is not None:
                raise ActionError(f"a contract is already deployed at {self.registry.address}", 409)
            self.registry = chain.deploy_registry(self.w3, self.key, open_enrolment=self.config.open_enrolment,
                                                  max_samples=self.config.max_samples)
            chain.record_deployment(self.settings.contract_record, self.w3, self.registry.address)
            self._rules_checked = False
            log.info("deployed the round registry at %s", self.registry.address)
            return self.registry.address

    def add_client(self, address: str) -> dict[str, Any]:
        registry = self.require_registry()
        if not self.w3.is_address(address):
            raise ActionError(f"'{address}' is not an Ethereum address", 400)
        if registry.is_client(address):
            return {"client": address, "added": False}
        tx = registry.add_client(self.key, address)
        return {"client": address, "added": True, "tx": tx.tx_hash, "gas": tx.gas_used}

    def start_first_round(self) -> dict[str, Any]:
        with self._lock:
            registry = self.require_registry()
            if registry.current_round() != 0:
                raise ActionError("the first round has already started", 409)
            timer = PhaseTimer()
            with timer.phase("initial_model"):
                weights = rounds.initial_model(self.task, seed=self.config.seed,
                                               pretrain_epochs=self.config.pretrain_epochs,
                                               training=self.config.training)
            with timer.phase("evaluation"):
                metrics = self.evaluate_on_test(weights)
            cid, _ = self._publish_model(weights, round_id=1, timer=timer)
            history = self.history()
            history["initial"] = metrics
            self._save_history(history)
            with timer.phase("chain"):
                self._apply_rules(registry)
                sent_at = time.time()  # the clients may hear of the round before its receipt is back here
                tx = registry.start_round(self.key, cid)
            history.update(first_opening_sent_at=sent_at, first_opened_at=time.time())
            self._save_history(history)
            log.info("round 1 started from %s (%s)", cid, self.task.describe(metrics))
            return {"round": 1, "base_cid": cid, "metrics": metrics, "tx": tx.tx_hash,
                    "gas": tx.gas_used, "seconds": timer.as_dict()}

    def _publish_model(self, weights, round_id: int, timer: PhaseTimer, curvature: RoundCurvature | None = None,
                       merged_samples: int | None = None) -> tuple[str, int]:
        """Fisher on the organization's validation data, encoded with the weights (and with a FedCurv
        round's statistics, or a secure round's total sample count), added to IPFS.

        Returns the CID and the size in bytes."""
        with timer.phase("fisher"):
            base = rounds.make_base(self.task, weights)
        with timer.phase("encoding"):
            notes = self._published_notes()
            if merged_samples is not None:
                notes["merged_samples"] = str(merged_samples)
            data = codec.encode_model(self.task, base.weights, base.fisher, round_id=round_id,
                                      plan=self.config.training, published=notes, curvature=curvature)
        with timer.phase("ipfs"):
            cid = retrying(self.settings, "adding the model to IPFS", lambda: self.store.add(data))
        self._published = (cid, weights)
        return cid, len(data)

    def _published_notes(self) -> dict[str, str]:
        """What every base model states besides its training plan: how the organization merges
        updates, how each client privatizes its delta (`codec.privacy_plan` reads it), and for a task
        spec, the CID of the spec: any device or auditor fetches the problem a round trains from it."""
        notes = {"merge": json.dumps(asdict(self.config.merge), sort_keys=True), "privacy": self.config.privacy.to_json()}
        if isinstance(self.task, SpecTask):
            if self._spec_cid is None:
                self._spec_cid = retrying(self.settings, "adding the task spec to IPFS",
                                          lambda: self.store.add(self.task.source))
            notes["task_spec"] = self._spec_cid
        return notes

    def _apply_rules(self, registry: chain.Registry) -> None:
        """Make the chain's round rules the configured ones before a round opens (once per process)."""
        if not self._rules_checked:
            if registry.round_rules() != self.config.rules:
                registry.set_round_rules(self.key, self.config.rules)
                log.info("round rules set: %s", self.config.rules)
            self._rules_checked = True

    def restart(self, round_id: int) -> dict[str, Any]:
        """End round `round_id`, which missed its quorum by its deadline, and open the next round
        from the same base."""
        with self._lock:
            registry = self.require_registry()
            info = retrying(self.settings, f"reading round {round_id}", lambda: self._started_round(registry, round_id))
            if info.finalized:
                raise ActionError(f"round {round_id} is already finalized", 409)
            if info.submissions >= info.quorum or not info.past_deadline(self.clock()):
                raise ActionError(f"round {round_id} has not missed its quorum: it has {info.submissions} of its "
                                  f"{info.quorum} updates and its deadline {deadline_text(info.deadline) or 'none'}",
                                  409)
            self._apply_rules(registry)
            registry.catch_up(info.deadline)
            sent_at = time.time()
            tx = registry.restart_round(self.key, round_id)
            history = self.history()
            previous = history["rounds"].get(str(round_id - 1), {}).get("metrics") or history["initial"]
            history["rounds"][str(round_id)] = {"missed_quorum": True, "metrics": previous,
                                                "submissions": info.submissions, "quorum": info.quorum,
                                                "model_cid": info.base_cid, "next_opening_sent_at": sent_at,
                                                "opened_next_at": time.time(), "epsilon": self.epsilon_after(round_id)}
            self._save_history(history)
            log.warning("round %d missed its quorum (%d of %d updates by its deadline); round %d opens from the "
                        "same base", round_id, info.submissions, info.quorum, round_id + 1)
            return {"round": round_id, "next_round": round_id + 1, "missed_quorum": True, "tx": tx.tx_hash,
                    "gas": tx.gas_used}

    def aggregate(self, round_id: int) -> dict[str, Any]:
        """Close round `round_id` to submissions, merge its valid deltas, publish the result, and
        finalize the round, which opens the next one from the result.

        Every submission the chain counts gets a verdict: closing first fixes the set. Safe to
        repeat after a crash at any point: until the round is finalized on chain nothing is final,
        and re-publishing the same model gives the same CID.
        """
        with self._lock:
            registry = self.require_registry()
            timer = PhaseTimer()
            with timer.phase("chain"):
                info = self._closed_round(registry, round_id)
            entry = self._merge_round(registry, info, timer)
            history = self.history()
            federated = entry.pop("federated_base")
            base_entry = history["initial"] if round_id == 1 else history["rounds"].get(str(round_id - 1))
            if federated is not None and base_entry is not None:  # the clients' evaluation of this round's base
                base_entry["federated"] = federated
            history["rounds"][str(round_id)] = entry
            self._save_history(history)  # what the merge measured, before the round is final
            with timer.phase("chain"):
                self._apply_rules(registry)
                sent_at = time.time()
                tx = registry.finalize_round(self.key, round_id, entry["model_cid"])
            entry.update(finalize_gas=tx.gas_used, seconds=timer.as_dict(), next_opening_sent_at=sent_at,
                         opened_next_at=time.time())
            self._save_history(history)
            log.info("round %d finalized with model %s; round %d open", round_id, entry["model_cid"], round_id + 1)
            return {"round": round_id, "next_round": round_id + 1, **entry}

    def _closed_round(self, registry: chain.Registry, round_id: int) -> chain.RoundInfo:
        """Round `round_id`'s record once it is closed to submissions (closed here if it is not yet)."""
        info = retrying(self.settings, f"reading round {round_id}", lambda: self._started_round(registry, round_id))
        if info.finalized:
            raise ActionError(f"round {round_id} is already finalized", 409)
        if not info.closed:
            if info.submissions < info.quorum:
                missed = info.past_deadline(self.clock())
                raise ActionError(f"round {round_id} has {info.submissions} of its quorum of {info.quorum} updates"
                                  + ("; its deadline has passed: restart it" if missed else ""), 409)
            registry.close_round(self.key, round_id)
            info = retrying(self.settings, f"reading round {round_id}", lambda: registry.round(round_id))
        return info

    def _merge_round(self, registry: chain.Registry, info: chain.RoundInfo, timer: PhaseTimer) -> dict[str, Any]:
        round_id = info.round_id
        with timer.phase("chain"):
            submissions = retrying(self.settings, f"reading round {round_id}'s submissions",
                                   lambda: registry.logged_submissions(info))
        if len(submissions) != info.submissions:
            raise ActionError(f"round {round_id} has {info.submissions} submissions on chain, but the node returned "
                              f"{len(submissions)} of their events; try again", 503)
        base_weights = self._base_weights(info.base_cid, timer)
        with timer.phase("ipfs"):
            if self.config.privacy.secure_aggregation:  # fetched once, then kept through its unmasking's waits
                if round_id not in self._received:
                    self._received = {round_id: self._fetch_updates(submissions)}
                received = self._received[round_id]
            else:
                received = self._fetch_updates(submissions)
        with timer.phase("aggregation"):
            samples = None  # a secure round's merged total: its only sample count anyone reads
            if self.config.privacy.secure_aggregation:
                merge, samples = self._merge_secure(registry, info, base_weights, received)
            else:
                merge = merge_round(self.task, base_weights, received, round_id, info.base_cid,
                                    self.config.merge, self.config.privacy,
                                    with_curvature=self.config.training.regularizer == "fedcurv")
        verdicts = {client: verdict.as_dict() for client, verdict in merge.verdicts.items()}
        for client, verdict in verdicts.items():
            if not verdict["accepted"]:
                log.warning("round %d: rejected the update of %s: %s", round_id, client, verdict["reason"])
        merged = merge.weights
        if merged is None:
            log.warning("round %d: every update was rejected; the next round starts from the same weights", round_id)
            merged = base_weights
        with timer.phase("evaluation"):
            metrics = self.evaluate_on_test(merged)
        model_cid, model_bytes = self._publish_model(merged, round_id=round_id + 1, timer=timer,
                                                     curvature=merge.curvature, merged_samples=samples)
        log.info("round %d: merged %d of %d updates, %s",
                 round_id, merge.accepted, len(submissions), self.task.describe(metrics))
        return {"metrics": metrics, "model_cid": model_cid, "model_bytes": model_bytes, "submissions": len(submissions),
                **({"merged_samples": samples} if samples is not None else {}),
                "accepted": merge.accepted, "verdicts": verdicts, "seconds": timer.as_dict(),
                "federated_base": weighted_mean(merge.evaluations()), "epsilon": self.epsilon_after(round_id)}

    def _merge_secure(self, registry: chain.Registry, info: chain.RoundInfo, base_weights,
                      received: list[Received]) -> tuple[RoundMerge, int]:
        """The secure round's merge and its merged total sample count; RoundWaiting while its
        unmasking stages are under way."""
        round_id, plan = info.round_id, self.config.privacy
        view = SecureRoundView.of(registry, info)
        holders = view.key_roster if view.key_roster is not None else self.invited_clients(info) or []
        result = secure_round.merge_secure_round(
            self.task, base_weights, received, view, registry, self.key, info, plan, holders,
            self.config.stage_seconds, self.clock(),
            lambda cid: self.store.get(cid, timeout=self._update_timeout, max_bytes=MAX_REVEAL_BYTES))
        if result.culprits:
            self._bar(round_id, result.culprits)
        if result.waiting:
            raise RoundWaiting(f"round {round_id} waits for {result.waiting}", messages=result.messages,
                               ends_at=result.ends_at)
        self._received.pop(round_id, None)
        return result.merge, result.samples

    def _bar(self, round_id: int, culprits: dict[str, str]) -> None:
        """Leave the clients whose keys, shares or vector made a secure round's group fail off the
        rosters of the plan's next rounds; on record in the history."""
        history = self.history()
        barred = history.setdefault("barred", {})
        for client, why in culprits.items():
            barred[client] = {"round": round_id, "until_round": round_id + self.config.privacy.exclusion_rounds,
                              "reason": why}
        self._save_history(history)

    def barred_clients(self, round_id: int) -> set[str]:
        """The clients left off round `round_id`'s rosters (they made an earlier secure round's group fail)."""
        return {client for client, record in self.history().get("barred", {}).items()
                if record["round"] < round_id <= record["until_round"]}

    @property
    def _update_timeout(self) -> float:
        """Seconds to wait for one update's bytes."""
        return self.config.fetch_timeout or self.settings.timeout

    def prefetch_update(self, cid: str) -> None:
        """Start fetching a submitted update now, so that its round's merge finds its bytes at hand
        (checked against the CID like any fetch). A failure here costs nothing: the merge fetches
        that update again."""
        with self._prefetch_lock:
            if cid in self._prefetched or len(self._prefetched) >= PREFETCH_LIMIT:
                return
            self._prefetched[cid] = self._prefetch_pool.submit(
                self.store.get, cid, timeout=self._update_timeout, max_bytes=self.config.max_update_bytes)

    def _take_prefetched(self, cid: str, timeout: float) -> bytes | None:
        with self._prefetch_lock:
            future = self._prefetched.pop(cid, None)
        if future is None:
            return None
        try:
            return future.result(timeout=timeout)
        except Exception:  # fetched again, and judged, by the merge
            return None

    def _drop_prefetched(self) -> None:
        with self._prefetch_lock:
            dropped, self._prefetched = self._prefetched, {}
        for future in dropped.values():
            future.cancel()

    def _fetch_updates(self, submissions: list[chain.Submission]) -> list[Received]:
        """Every submission's bytes, fetched concurrently under one deadline for the round; what
        could not be fetched carries the reason instead. An IPFS outage is raised: the round waits."""
        timeout = self._update_timeout
        deadline = time.monotonic() + FETCH_DEADLINES * timeout

        def fetch(sub: chain.Submission) -> Received:  # in a worker thread
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Received(sub.client, sub.num_samples, fetch_error=(
                    f"not fetched within the round's {FETCH_DEADLINES * timeout:g} s for fetching updates"))
            data = self._take_prefetched(sub.cid, min(timeout, remaining))
            if data is not None:
                return Received(sub.client, sub.num_samples, data)
            try:
                data = retrying(self.settings, f"fetching the update {sub.cid}", lambda: self.store.get(
                    sub.cid, timeout=min(timeout, remaining), max_bytes=self.config.max_update_bytes))
            except ipfs.StorageUnavailable:
                raise
            except ipfs.StorageError as exc:
                return Received(sub.client, sub.num_samples, fetch_error=describe_error(exc))
            except Exception as exc:  # a defect: still this update's verdict, not the round's failure
                log.exception("fetching the update %s of %s failed unexpectedly", sub.cid, sub.client)
                return Received(sub.client, sub.num_samples, fetch_error=f"the update could not be fetched "
                                                                         f"({type(exc).__name__}: {exc})")
            return Received(sub.client, sub.num_samples, data)

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(FETCH_WORKERS, len(submissions))),
                                    thread_name_prefix="fetch") as pool:
                return list(pool.map(fetch, submissions))
        finally:
            self._drop_prefetched()  # what no submission of this round named

    def _base_weights(self, cid: str, timer: PhaseTimer) -> dict:
        """The weights of the base model `cid`: kept from publishing it, or (after a restart) fetched."""
        if self._published is not None and self._published[0] == cid:
            return self._published[1]
        with timer.phase("ipfs"):
            data = retrying(self.settings, f"fetching the base {cid}",
                            lambda: self.store.get(cid, max_bytes=self.config.max_update_bytes))
        with timer.phase("decoding"):
            weights = codec.decode_model(self.task, data).weights
        return weights
