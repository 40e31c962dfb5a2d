"""The organization's side of a round: publish the base model, validate and merge the clients' deltas.

The chain is the source of truth for rounds; `history.json` only caches what the organization
measured (accuracy, validation verdicts), so a restarted organization carries on from the chain.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from eth_account import Account

import chain
import storage
from processor import codec, rounds
from processor.tasks import get_task
from runtime import ActionError, PhaseTimer, describe_error, fetched_ahead, find_registry, retrying, store_status
from settings import Settings

log = logging.getLogger("organization")
FETCH_AHEAD = 4  # updates fetched at once while the merge checks and adds the one before


@dataclass(frozen=True)
class OrganizationConfig:
    task: str = "mnist"
    seed: int = 0
    pretrain_epochs: int = 0  # 0 = random initial model; >0 = pretrained on the organization's own data
    aggregation: str = "fedavg"  # fedavg, median, trimmed_mean
    clip_norm: float | None = None  # clip each delta to this L2 norm before merging
    max_delta_norm: float = 1e3  # deltas above this norm are rejected as malformed
    max_update_bytes: int = 64 * 1024 * 1024
    fetch_timeout: float | None = None  # seconds to wait for one update (None: FL_TIMEOUT); then it is rejected
    open_enrolment: bool = False


class OrganizationService:
    def __init__(
        self,
        settings: Settings,
        config: OrganizationConfig,
        w3,
        store: storage.ContentStore,
        registry: chain.Registry | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.task = get_task(config.task)
        self.w3 = w3
        self.store = store
        self.key = settings.org_key or chain.DEV_KEYS[0]
        self.address = Account.from_key(self.key).address
        self.registry = registry or find_registry(w3, settings)
        self._lock = threading.Lock()  # one round-moving action at a time
        self._published: tuple[str, dict] | None = None  # (CID, weights) of the last model this process published
        self._opened: chain.RoundInfo | None = None  # the last round this process opened, as it opened it

    # ---- state -------------------------------------------------------------------------

    def require_registry(self) -> chain.Registry:
        if self.registry is None:
            raise ActionError("no contract is deployed on this chain yet: deploy it first", 409)
        return self.registry

    @property
    def history_path(self) -> Path:
        address = self.registry.address if self.registry else "undeployed"
        return self.settings.state_dir / "organization" / address / "history.json"

    def history(self) -> dict[str, Any]:
        try:
            return json.loads(self.history_path.read_text())
        except (OSError, ValueError):
            return {"initial": None, "rounds": {}}

    def _save_history(self, history: dict[str, Any]) -> None:
        storage.write_atomically(self.history_path, json.dumps(history, indent=1).encode())

    def chain_status(self) -> dict[str, Any]:
        try:
            return {"ok": True, "url": self.settings.chain_url, "chain_id": self.w3.eth.chain_id,
                    "block": self.w3.eth.block_number}
        except Exception as exc:
            return {"ok": False, "url": self.settings.chain_url, "error": describe_error(exc)}

    def ipfs_status(self) -> dict[str, Any]:
        return store_status(self.store)

    @staticmethod
    def _started_round(registry: chain.Registry, round_id: int) -> chain.RoundInfo:
        """Round `round_id`'s record on chain; 404 for a round that has not started."""
        info = registry.round(round_id) if round_id >= 1 else None
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
            "finalized": info.finalized, "submission_count": info.submissions,
            "base_gateway": self.store.gateway_url(info.base_cid), "submissions": submissions,
            "result": result,
        }

    def status(self) -> dict[str, Any]:
        chain_state = self.chain_status()
        status: dict[str, Any] = {
            "task": self.task.name, "organization": self.address, "chain": chain_state,
            "ipfs": self.ipfs_status(), "contract": None, "current_round": None, "previous_round": None,
            "history": self.accuracy_history(),
        }
        if self.registry is not None and chain_state["ok"]:
            status["contract"] = {"address": self.registry.address,
                                  "open_enrolment": self.registry.open_enrolment()}
            current = self.registry.current_round()
            if current:
                status["current_round"] = self.round_view(current)
            if current > 1:  # its verdicts say why updates were left out of the model in use now
                status["previous_round"] = self.round_view(current - 1)
        return status

    def accuracy_history(self) -> list[dict[str, Any]]:
        """Test metrics of the initial model (round 0) and of each round's merged model."""
        history = self.history()
        points = [{"round": 0, **history["initial"]}] if history["initial"] else []
        for key in sorted(history["rounds"], key=int):
            entry = history["rounds"][key]
            points.append({"round": int(key), **entry["metrics"]})
        return points

    def evaluate_on_test(self, weights) -> dict[str, float]:
        data = self.task.data()
        return self.task.evaluate(weights, data.x_test, data.y_test)

    # ---- actions -----------------------------------------------------------------------

    def deploy(self) -> str:
        with self._lock:
            if self.registry is not None:
                raise ActionError(f"a contract is already deployed at {self.registry.address}", 409)
            self.registry = chain.deploy_registry(self.w3, self.key, open_enrolment=self.config.open_enrolment)
            chain.record_deployment(self.settings.contract_record, self.w3, self.registry.address)
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
                                               pretrain_epochs=self.config.pretrain_epochs)
            with timer.phase("evaluation"):
                metrics = self.evaluate_on_test(weights)
            cid, _ = self._publish_model(weights, round_id=1, timer=timer)
            history = self.history()
            history["initial"] = metrics
            self._save_history(history)
            with timer.phase("chain"):
                tx = registry.start_round(self.key, cid)
            self._opened = chain.RoundInfo.opened(1, cid, tx.block_number)
            log.info("round 1 started from %s (test accuracy %.4f)", cid, metrics["accuracy"])
            return {"round": 1, "base_cid": cid, "metrics": metrics, "tx": tx.tx_hash,
                    "gas": tx.gas_used, "seconds": timer.as_dict()}

    def _publish_model(self, weights, round_id: int, timer: PhaseTimer) -> tuple[str, int]:
        """Fisher on the organization's validation data, encoded with the weights, added to IPFS.

        Returns the CID and the size in bytes."""
        with timer.phase("fisher"):
            base = rounds.make_base(self.task, weights)
        with timer.phase("encoding"):
            data = codec.encode_model(self.task, base.weights, base.fisher, round_id=round_id)
        with timer.phase("ipfs"):
            cid = retrying(self.settings, "adding the model to IPFS", lambda: self.store.add(data))
        self._published = (cid, weights)
        return cid, len(data)

    def aggregate(self, round_id: int) -> dict[str, Any]:
        """Merge round `round_id`'s valid deltas, publish the result, and finalize the round, which
        opens the next one from the result.

        Safe to repeat after a crash at any point: until the round is finalized on chain nothing
        is final, and re-publishing the same model gives the same CID.
        """
        with self._lock:
            registry = self.require_registry()
            timer = PhaseTimer()
            with timer.phase("chain"):
                info = self._round_to_merge(registry, round_id)
            entry = self._merge_round(registry, round_id, info, timer)
            history = self.history()
            history["rounds"][str(round_id)] = entry
            self._save_history(history)  # what the merge measured, before the round is final
            if os.environ.get("FL_FAULT_BEFORE_FINALIZE"):
                # Fault-injection tests: die where a crash hurts most, model published, round not final.
                log.error("FL_FAULT_BEFORE_FINALIZE is set: exiting before finalizing round %d", round_id)
                os._exit(70)
            with timer.phase("chain"):
                tx = registry.finalize_round(self.key, round_id, entry["model_cid"])
            self._opened = chain.RoundInfo.opened(round_id + 1, entry["model_cid"], tx.block_number)
            entry.update(finalize_gas=tx.gas_used, seconds=timer.as_dict())
            self._save_history(history)
            log.info("round %d finalized with model %s; round %d open", round_id, entry["model_cid"], round_id + 1)
            return {"round": round_id, "next_round": round_id + 1, **entry}

    def _round_to_merge(self, registry: chain.Registry, round_id: int) -> chain.RoundInfo:
        """Round `round_id`'s record; the round this process opened is known without asking the chain
        (a view call each round: 7 ms of Ganache's CPU). Should another process with the same key
        finalize it meanwhile, finalizeRound reverts with RoundAlreadyFinalized."""
        if self._opened is not None and self._opened.round_id == round_id:
            return self._opened
        info = retrying(self.settings, f"reading round {round_id}", lambda: self._started_round(registry, round_id))
        if info.finalized:
            raise ActionError(f"round {round_id} is already finalized", 409)
        return info

    def _merge_round(self, registry: chain.Registry, round_id: int, info, timer: PhaseTimer) -> dict[str, Any]:
        with timer.phase("chain"):
            submissions = retrying(self.settings, f"reading round {round_id}'s submissions",
                                   lambda: registry.logged_submissions(info))
        if not submissions:
            raise ActionError(f"round {round_id} has no submissions yet", 409)
        base_weights = self._base_weights(info.base_cid, timer)

        verdicts: dict[str, dict[str, Any]] = {}

        def fetch(sub: chain.Submission) -> bytes:  # in a worker thread
            return retrying(self.settings, f"fetching the update {sub.cid}", lambda: self.store.get(
                sub.cid, timeout=self.config.fetch_timeout, max_bytes=self.config.max_update_bytes))

        def valid_deltas() -> Iterator[tuple[dict, int]]:
            # Fetched a few ahead, checked and handed to the streaming merge one at a time.
            for sub, fetching in fetched_ahead(submissions, fetch, FETCH_AHEAD):
                try:
                    with timer.phase("ipfs"):
                        data = fetching.result()
                    delta = self._checked_delta(sub, data, round_id, info.base_cid, timer)
                except storage.StorageUnavailable:
                    raise  # an outage says nothing about the update: the round waits for IPFS to return
                except (codec.CodecError, storage.StorageError, ValueError) as exc:
                    verdicts[sub.client] = {"accepted": False, "reason": describe_error(exc)}
                    log.warning("round %d: rejected %s from %s: %s", round_id, sub.cid, sub.client, exc)
                    continue
                verdicts[sub.client] = {"accepted": True, "reason": None}
                yield delta, sub.num_samples

        with timer.phase("aggregation"):
            merged = rounds.aggregate(base_weights, valid_deltas(), method=self.config.aggregation,
                                      clip_norm=self.config.clip_norm)
        accepted = sum(v["accepted"] for v in verdicts.values())
        if accepted == 0:
            raise ActionError(f"round {round_id}: every submission was rejected: "
                              + "; ".join(f"{c}: {v['reason']}" for c, v in verdicts.items()), 409)
        with timer.phase("evaluation"):
            metrics = self.evaluate_on_test(merged)
        model_cid, model_bytes = self._publish_model(merged, round_id=round_id + 1, timer=timer)
        log.info("round %d: merged %d of %d updates, test accuracy %.4f",
                 round_id, accepted, len(submissions), metrics["accuracy"])
        return {"metrics": metrics, "model_cid": model_cid, "model_bytes": model_bytes, "submissions": len(submissions),
                "accepted": accepted, "verdicts": verdicts, "seconds": timer.as_dict()}

    def _base_weights(self, cid: str, timer: PhaseTimer) -> dict:
        """The weights of the base model `cid`: kept from publishing it, or (after a restart) fetched."""
        if self._published is not None and self._published[0] == cid:
            return self._published[1]
        with timer.phase("ipfs"):
            data = retrying(self.settings, f"fetching the base {cid}",
                            lambda: self.store.get(cid, max_bytes=self.config.max_update_bytes))
        with timer.phase("decoding"):
            weights, _, _ = codec.decode_model(self.task, data)
        return weights

    def _checked_delta(self, sub: chain.Submission, data: bytes, round_id: int, base_cid: str,
                       timer: PhaseTimer) -> dict:
        """The delta in `data`, the update `sub` names; ValueError or CodecError says why it is refused."""
        with timer.phase("validation"):
            delta, meta = codec.decode_delta(self.task, data, expected_round=round_id,
                                             expected_base_cid=base_cid)
            if meta.get("client", "").lower() != sub.client.lower():
                raise ValueError(f"the update names client {meta.get('client')!r}, but {sub.client} submitted it")
            if int(meta["num_samples"]) != sub.num_samples:
                raise ValueError(f"the update claims {meta['num_samples']} samples, "
                                 f"the chain records {sub.num_samples}")
            codec.validate_delta(self.task, delta, max_norm=self.config.max_delta_norm)
        return delta
