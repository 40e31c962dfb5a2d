"""A device that takes part by itself: it follows the chain, and in every round that invites it
pulls the base and its plan, trains, and publishes once.

It reads only the chain to decide (never its own memory), so after a restart it carries on from
what the chain says: a round it has submitted to is never submitted to again, and a round still
open that it has not submitted to is joined. What it does is shown on the device's page and written
to an activity log, one JSON line per event.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from client.service import ClientService
from infra import chain, ipfs
from infra.files import append_json_line
from infra.webapp import ActionError, JobRunner, describe_error

log = logging.getLogger("client.agent")
# Between looks at the block number where the node pushes no blocks (the embedded chain): a new
# round is noticed within this. Every look costs CPU that a round's training competes for.
POLL_SECONDS = 0.25
# The round is read again this often without a round opening: to say that a deadline passed, and in
# case a notification was lost (a reconnected subscription looks at once anyway).
RECHECK_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 5.0  # between attempts while the chain or IPFS is down


class ClientAgent:
    """One device's decisions; an AgentWatcher wakes it (one watcher may wake many agents)."""

    def __init__(self, service: ClientService, jobs: JobRunner) -> None:
        self.service = service
        self.jobs = jobs
        self.activity_path = service.settings.state_dir / "client" / service.address / "activity.jsonl"
        self.state = "starting"
        self.last_event: dict[str, Any] | None = None
        self._finished_rounds: set[int] = set()  # rounds with an outcome: submitted, refused, missed
        self._enrolled_from = 0  # the first round this client may take part in, once the chain says it
        self.resumable: chain.ClientRound | None = None  # a round whose next step may be taken at once
        self.awaiting: chain.ClientRound | None = None  # a round whose next step awaits a roster

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "last_event": self.last_event}

    def _record(self, round_id: int, event: str, **details) -> None:
        self.last_event = {"time": time.time(), "round": round_id, "event": event, **details}
        append_json_line(self.activity_path, self.last_event)

    def ignores(self, logs: list | None) -> bool:
        """Whether pushed `logs` call for no look. Other clients' secure-round messages do not: only
        the organization's rosters move a client's stage on; nor does the closing of a secure round
        this client submitted to (its unmask roster comes next)."""
        return bool(logs) and all(self._is_clients_message(log) or self._awaits_unmask_roster(log) for log in logs)

    def look(self, logs: list | None) -> None:
        """What the watcher calls: `logs` are the logs pushed, None for a look at the chain."""
        if self.ignores(logs):
            return
        if self._steps_on_roster(logs):
            return
        self.check_round(self._announced(logs))

    def _steps_on_roster(self, logs: list | None) -> bool:
        """Take the next step of the round a roster among `logs` moves on, when the logs hold only
        secure-round messages: the round as this client last read it serves (the step reads what it
        needs of the chain, and looks at the round's closing before it publishes), so a hundred
        devices of a process do not each ask the chain for the round."""
        if not logs or (self.awaiting is None and self.service.secure_party is None):
            return False
        try:
            registry = self.service.registry
        except ActionError:
            return False
        by_client = [registry.sent_by_client(log) for log in logs]
        if None in by_client:
            return False
        rounds = {int.from_bytes(bytes(log["topics"][1]), "big") for log, sent in zip(logs, by_client) if not sent}
        party = self.service.secure_party
        if self.awaiting is not None and self.awaiting.round_id in rounds:
            self._take_part(self.awaiting)
        elif party is not None and party.round_id in rounds and party.submitted and not party.revealed:
            self._after_closing(party.round_id)
        else:
            return False
        return True

    def _awaits_unmask_roster(self, raw_log) -> bool:
        party = self.service.secure_party
        try:
            registry = self.service.registry
        except ActionError:
            return False
        return (party is not None and party.submitted and not party.unmasked
                and registry.emitted(raw_log, "RoundClosed")
                and int.from_bytes(bytes(raw_log["topics"][1]), "big") == party.round_id)  # its indexed round

    def _is_clients_message(self, raw_log) -> bool:
        try:
            registry = self.service.registry
        except ActionError:
            return False
        return bool(registry.sent_by_client(raw_log))

    def done_with(self, round_id: int) -> bool:
        """Whether round `round_id` has had its outcome for this client (learnt from the chain)."""
        return round_id in self._finished_rounds

    def _announced(self, logs: list | None) -> chain.StartedRound | None:
        """The latest round the pushed logs opened; None when none did (a recheck reads the chain)."""
        if not logs:
            return None
        try:
            registry = self.service.registry
        except ActionError:
            return None
        started = [registry.pushed_round(log) for log in logs if registry.emitted(log, "RoundStarted")]
        return max(started, key=lambda round_started: round_started.round_id, default=None)

    def _enrolled_for(self, round_id: int) -> bool:
        registry = self.service.registry
        if registry.open_enrolment:
            return True
        if not self._enrolled_from:  # asked until enrolled; a removal later shows as the contract's refusal
            self._enrolled_from = registry.enrolled_from(self.service.address)
        return 0 < self._enrolled_from <= round_id

    def waiting(self, exc: Exception, wait: float) -> None:  # an outage: said, then tried again later
        self.state = f"waiting for the chain or IPFS: {describe_error(exc)}"
        log.warning("agent: %s; trying again in %.1f s", self.state, wait)

    def check_round(self, announced: chain.StartedRound | None = None) -> None:
        """Take part in the current round if this client can: the round as its RoundStarted event
        `announced` it (no call to the chain: the event says all it needs), or else as read from
        the chain."""
        try:
            registry = self.service.registry
        except ActionError as exc:  # no contract yet
            self.state = str(exc)
            return
        address = self.service.address
        opened = (announced.as_seen_by(address, self._enrolled_for(announced.round_id)) if announced is not None
                  else registry.current_round_for(address))
        round_id = opened.round_id
        if round_id == 0:
            self.state = "waiting for the first round"
        elif opened.submitted:
            if round_id not in self._finished_rounds:  # after a restart, or a submission made by hand
                self._finished_rounds.add(round_id)
                self._record(round_id, "already_submitted")
            party = self.service.secure_party
            if party is not None and party.round_id == round_id and not party.revealed and not opened.open:
                self._after_closing(round_id)
            else:
                self.state = f"submitted to round {round_id}; waiting for the next round"
        elif round_id in self._finished_rounds:
            self.state = f"done with round {round_id}; waiting for the next round"
        elif not opened.invited:
            self._finished_rounds.add(round_id)
            self._record(round_id, "not_invited")
            self.state = f"round {round_id} does not invite this client; waiting for the next round"
        elif not opened.open or (opened.deadline and time.time() > opened.deadline):
            self._finished_rounds.add(round_id)
            self._record(round_id, "missed", reason="closed to submissions before this client could take part")
            self.state = f"round {round_id} closed before this client could take part"
        else:
            self._take_part(opened)

    def _take_part(self, opened: chain.ClientRound, resumed: bool = False) -> None:
        round_id, self.resumable, self.awaiting = opened.round_id, None, None
        if self.jobs.busy:  # a person's action is running: the agent waits for it
            self.state = f"waiting for '{self.jobs.current.name}' to finish"
            return
        self._record(round_id, "noticed")
        self.state = f"taking part in round {round_id}"
        try:
            job = self.jobs.start("participate", lambda job: self.service.participate(job, opened, resumed), wait=True)
        except ActionError as exc:
            if exc.status >= 500:  # a node's outage or a base that cannot be used now: tried again
                self._record(round_id, "failed", reason=str(exc))
                raise
            self._finished_rounds.add(round_id)
            self._record(round_id, "refused", reason=str(exc))
            self.state = f"round {round_id}: {exc}"
        except chain.ContractError as exc:  # the contract's last word for this round (DeadlinePassed, ...)
            self._finished_rounds.add(round_id)
            self._record(round_id, "refused", reason=str(exc), error=exc.name)
            self.state = f"round {round_id}: the contract refused the update: {exc}"
            log.warning("agent: round %d: the contract refused the update: %s", round_id, exc)
        except (chain.ChainUnavailable, ipfs.StorageError) as exc:
            self._record(round_id, "failed", reason=describe_error(exc))
            raise
        else:
            result = job.result
            if "waiting" in result:  # a secure round's next stage is not there yet: the next look goes on
                self.state = f"round {round_id}: waiting for {result['waiting']}"
                if result.get("resume"):  # or its next step is this device's own: taken after the others' look
                    self.resumable = opened
                else:
                    self.awaiting = opened
                return
            self._finished_rounds.add(round_id)
            if "left_out" in result:
                self._record(round_id, "left_out", reason=result["left_out"])
                self.state = f"round {round_id}: left out: {result['left_out']}"
                return
            self._record(round_id, "submitted", cid=result["cid"], tx=result["tx"],
                         seconds=result["seconds"])  # where the device's time went: chain, ipfs, training...
            self.state = f"submitted to round {round_id}; waiting for the next round"

    @property
    def trains_next(self) -> bool:
        """Whether the step this agent may take at once is its training."""
        return self.resumable is not None and not self.service.trained_for(self.resumable)

    def resume(self) -> None:
        """Take the next step of the round whose last step said it may go on at once."""
        opened, self.resumable = self.resumable, None
        if opened is not None:
            self._take_part(opened, resumed=True)

    def _after_closing(self, round_id: int) -> None:
        """A secure round this client submitted to is closed: unmask and reveal what the merge needs."""
        try:
            job = self.jobs.start("unmask", lambda job: self.service.after_closing(round_id), wait=True)
        except ActionError as exc:
            if exc.status >= 500:
                raise
            self.state = f"round {round_id}: {exc}"
            return
        done = job.result
        if "unmasked_for" in done:
            self._record(round_id, "unmasked", dropped=done["unmasked_for"])
        if "revealed_for" in done:
            self._record(round_id, "revealed", recovered=done["revealed_for"])
            self.state = f"round {round_id}: revealed shares for the {len(done['revealed_for'])} clients it was asked for"
        elif "unmasked_for" in done:
            self.state = (f"round {round_id}: unmasked its update (its seed, and its keys with the "
                          f"{len(done['unmasked_for'])} dropped clients of its group)")


class AgentWatcher:
    """One BlockWatcher for any number of agents on one chain connection: woken by a round's opening,
    its closing and its secure-aggregation messages (the other clients' submissions do not concern
    them), it hands every look to each agent, up to `parallel` at a time. Their training takes turns
    on the process's one model (the task's lock), in a lane of its own when `parallel` > 1: a
    secure round's devices train there as soon as their keys are out, while the others' keys and
    masked updates go out beside it. A hundred agents thus cost one subscription."""

    def __init__(self, agents: list[ClientAgent], poll_seconds: float = POLL_SECONDS, parallel: int = 1) -> None:
        self.agents = agents
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="client-agent") if parallel > 1 else None
        self._training_lane = ThreadPoolExecutor(1, thread_name_prefix="client-training") if parallel > 1 else None
        self._failed: list[ClientAgent] = []  # the agents whose last look failed
        self._watcher = chain.BlockWatcher("client-agents", agents[0].service.w3, self._look, self._waiting,
                                           poll_seconds, RECHECK_SECONDS, MAX_BACKOFF_SECONDS,
                                           chain.event_topics("RoundStarted", "RoundMessage", "RoundClosed"))

    def start(self) -> "AgentWatcher":
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()
        for pool in (self._pool, self._training_lane):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _due(self, logs: list | None) -> list[ClientAgent]:
        """The agents a look concerns. A recheck (no logs) reads the current round once and leaves
        out the agents done with it: a hundred idle agents cost one call, not a hundred."""
        if logs is not None or len(self.agents) == 1:
            return self.agents
        try:
            registry = self.agents[0].service.registry
        except ActionError:  # no contract yet: each agent says so
            return self.agents
        current = registry.current_round()
        return [agent for agent in self.agents if not agent.done_with(current)]

    def _look(self, logs: list | None) -> bool:
        """Every due agent looks, and those that may go on at once take their next steps (a secure
        round's training, then its masked update); the failed ones are tried again by the watcher's
        next look. One at a time, every agent looks before any goes on: the organization's roster
        then need not wait for the agents' turns at the model."""
        due = [agent for agent in self._due(logs) if not agent.ignores(logs)]  # in this thread: a hundred
        # agents ignore each client's message, which need not go through the pool
        errors = self._in_turn(due, logs) if self._pool is None else self._overlapped(due, logs)
        self._failed = [agent for agent in due if errors[agent] is not None]
        if self._failed:
            raise errors[self._failed[0]]
        return False  # devices take part for as long as they run

    @staticmethod
    def _in_turn(due: list[ClientAgent], logs: list | None) -> dict[ClientAgent, Exception | None]:
        errors = {agent: _outcome(lambda: agent.look(logs)) for agent in due}
        while resumable := [agent for agent in due if errors[agent] is None and agent.resumable]:
            errors.update({agent: _outcome(agent.resume) for agent in resumable})
        return errors

    def _overlapped(self, due: list[ClientAgent], logs: list | None) -> dict[ClientAgent, Exception | None]:
        """Each agent's next step is handed on as soon as its last one ends: its training to the
        training lane, anything else to the pool."""
        errors: dict[ClientAgent, Exception | None] = {}
        running = {self._pool.submit(_outcome, lambda agent=agent: agent.look(logs)): agent for agent in due}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                agent = running.pop(future)
                errors[agent] = future.result()
                if errors[agent] is None and agent.resumable:
                    lane = self._training_lane if agent.trains_next else self._pool
                    running[lane.submit(_outcome, agent.resume)] = agent
        return errors

    def _waiting(self, exc: Exception, wait: float) -> None:
        for agent in self._failed or self.agents:  # before any look: the chain itself failed
            agent.waiting(exc, wait)
        self._failed = []


def _outcome(action) -> Exception | None:
    try:
        action()
    except Exception as exc:
        return exc
    return None
