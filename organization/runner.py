"""The organization running the rounds by itself: it opens the first round, closes each one once
every invited client has submitted or its deadline has passed, merges what arrived and publishes
(which opens the next round), restarts a round that missed its quorum, and stops after the
configured number of rounds, once the target accuracy is reached, or before a round would spend
more than the privacy plan's epsilon budget.

Each decision is read from the chain, so a restarted organization carries on where it stopped
(a round left closed but not finalized is merged again).
"""
from __future__ import annotations

import logging

from infra import chain
from infra.webapp import describe_error
from organization.service import OrganizationService, RoundWaiting
from processor import privacy

log = logging.getLogger("organization.runner")
POLL_SECONDS = 0.1  # between looks at the block number where no blocks are pushed (the embedded chain)
# The round is read again this often without an update: for actions taken by hand meanwhile, and in
# case a notification was lost. A deadline is looked at when it comes, whatever this is.
RECHECK_SECONDS = 5.0
DEADLINE_MARGIN_SECONDS = 1.0  # block timestamps are whole seconds: act once the next block is surely past it
MAX_BACKOFF_SECONDS = 5.0


class RoundRunner:
    def __init__(self, service: OrganizationService, poll_seconds: float = POLL_SECONDS) -> None:
        self.service = service
        self.state = "starting"
        self._current = 0  # the round last seen current
        self._updates_awaited: int | None = None  # updates the open round lacked at the last look
        self._messages_awaited: int | None = None  # a secure round's stage: client messages it lacked
        self._stage_ends_at = 0.0  # when that stage ends regardless (0: none awaited)
        self._deadline = 0  # the open round's, as read at the last look
        # Woken by what moves a round on: an update, or a client enrolling before the first round.
        # Its own transactions call for no look; the recheck catches deadlines and actions by hand.
        self._watcher = chain.BlockWatcher("round-runner", service.w3, self.step, self._waiting, poll_seconds,
                                           RECHECK_SECONDS, MAX_BACKOFF_SECONDS,
                                           chain.event_topics("UpdateSubmitted", "ClientAdded", "RoundMessage"))
        self.finished = self._watcher.done
        self._rounds_allowed = privacy.rounds_within_budget(service.config.privacy)  # None: no budget

    def start(self) -> "RoundRunner":
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()

    def status(self) -> dict:
        config = self.service.config
        return {"state": self.state, "rounds": config.rounds, "target_accuracy": config.target_accuracy,
                "finished": self.finished.is_set()}

    def _waiting(self, exc: Exception, wait: float) -> None:  # an outage, or a round that cannot move yet
        self.state = f"waiting: {describe_error(exc)}"
        log.warning("%s; trying again in %.1f s", self.state, wait)

    def rounds_done(self) -> tuple[int, dict | None]:
        """Rounds merged so far and the latest model's test metrics: a round counts once it merged
        an update (not when it missed its quorum, or refused every update it had)."""
        points = self.service.accuracy_history()
        merged = [p for p in points if p["round"] > 0 and p["merged"]]
        return len(merged), (points[-1] if points else None)

    def _current_round(self, registry: chain.Registry) -> tuple[int, chain.RoundInfo | None]:
        """The current round and its record. The number is asked anew only once the round known
        is finalized (or has not started): one call per look instead of two."""
        if self._current:
            info = registry.round(self._current)
            if info.start_block and not info.finalized:
                return self._current, info
        self._current = registry.current_round()
        return self._current, registry.round(self._current) if self._current else None

    def step(self, logs: list | None = None) -> bool:
        """One look at the chain and what it calls for; True once the run is over. `logs`: what woke
        it, when known. Submissions that still leave the round short of its invited clients call for
        no look: the round is read once the last one comes (or the recheck is due)."""
        registry = self.service.registry
        updates = [log for log in logs if registry.emitted(log, "UpdateSubmitted")] if logs and registry else []
        for raw_log in updates:  # fetched while the round goes on: its merge needs them
            self.service.prefetch_update(registry.pushed_submission(raw_log)[1].cid)
        if self._updates_awaited is not None and logs and len(updates) == len(logs) < self._updates_awaited:
            self._updates_awaited -= len(updates)
            self._look_at_deadline()
            self.state = f"round {self._current}: waiting for {self._updates_awaited} more invited clients' updates"
            return False
        self._updates_awaited = None
        # A secure round's stage: the clients' messages that leave it incomplete call for no look either
        by_client = [registry.sent_by_client(log) for log in logs] if logs and registry else []
        from_clients = sum(sent is True for sent in by_client)
        if (self._messages_awaited is not None and by_client and all(sent is not None for sent in by_client)
                and from_clients < self._messages_awaited):
            self._messages_awaited -= from_clients
            self._look_at_deadline()
            return False
        self._messages_awaited, self._stage_ends_at = None, 0.0
        service = self.service
        if service.registry is None:
            self.state = "deploying the round registry"
            service.deploy()
        registry = service.registry
        done, latest = self.rounds_done()
        target = service.config.target_accuracy  # a class label's only (the service refuses one for a number)
        if done >= service.config.rounds or (target is not None and latest is not None and latest["accuracy"] >= target):
            self.state = f"finished: {done} rounds merged, {service.task.describe(latest)}"
            log.info(self.state)
            return True
        current, info = self._current_round(registry)
        if self._rounds_allowed is not None and max(current, 1) > self._rounds_allowed:
            self.state = self._budget_spent(max(current, 1), done, latest)
            log.info(self.state)
            return True
        if current == 0:
            enrolled = service.enrolled_clients(1)
            if enrolled is not None and len(enrolled) < service.config.rules.quorum:
                self.state = (f"waiting for clients to enrol: {len(enrolled)} of the quorum of "
                              f"{service.config.rules.quorum} (the dashboard, the API or run.py enrol)")
                return False
            self.state = "opening the first round"
            service.start_first_round()
            return False
        if info.closed and not info.finalized and info.submissions >= info.quorum:  # left half done by a crash
            return self._merge(current)  # or a secure round waiting for revealed shares
        secure = service.config.privacy.secure_aggregation
        stage = service.advance_secure_round(info) if secure and not info.past_deadline(service.clock()) else None
        expected = stage.expected if stage is not None else service.expected_submissions(info)
        everyone_in = expected is not None and info.submissions >= max(expected, 1)
        past_deadline = info.past_deadline(service.clock() - DEADLINE_MARGIN_SECONDS)
        if info.submissions >= info.quorum and (everyone_in or past_deadline):
            self.state = f"merging round {current} ({info.submissions} of {expected or '?'} updates)"
            return self._merge(current)
        elif past_deadline:
            self.state = (f"restarting round {current}: {info.submissions} of its quorum of {info.quorum} "
                          "by its deadline")
            service.restart(current)
            self._current = current + 1  # so did restarting
        elif stage is not None and expected is None:
            self.state = f"round {current} (secure): waiting for {stage.text}"
            self._messages_awaited = stage.messages
            self._stage_ends_at = stage.ends_at
            self._deadline = info.deadline
            self._look_at_deadline()
        else:
            self.state = (f"round {current}: {info.submissions} of {expected if expected is not None else '?'} "
                          f"invited clients have submitted (quorum {info.quorum})")
            if expected is not None:
                self._updates_awaited = expected - info.submissions
            self._deadline = info.deadline
            self._look_at_deadline()
        return False

    def _merge(self, current: int) -> bool:
        try:
            self.service.aggregate(current)
        except RoundWaiting as exc:  # the clients' messages wake the runner; so does the stage's end
            self.state = str(exc)
            self._messages_awaited, self._stage_ends_at = exc.messages, exc.ends_at
            self._look_at_deadline()
            return False
        self._current = current + 1  # finalizing opened the next round
        return False

    def _budget_spent(self, round_id: int, done: int, latest: dict | None) -> str:
        """Why the run ends before round `round_id`: its updates would spend more than the budget.
        Its clients refuse to train in it (client.service), should it be open already."""
        plan = self.service.config.privacy
        shown = "no test metrics yet" if latest is None else self.service.task.describe(latest)
        return (f"finished: the privacy budget is spent: round {round_id} would take epsilon to "
                f"{privacy.epsilon_spent(round_id, plan):.2f}, above the budget of {plan.epsilon_budget:g} "
                f"(delta {plan.delta:g}); {done} rounds merged, {shown}")

    def _look_at_deadline(self) -> None:
        """Have the watcher look once the open round's deadline is surely past (and a secure round's
        stage, when it waits for one to end)."""
        for moment in (self._deadline, self._stage_ends_at):
            if moment:
                self._watcher.look_within(moment + DEADLINE_MARGIN_SECONDS + 0.1 - self.service.clock())
