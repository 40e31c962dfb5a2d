"""RoundRegistry's invariants under random call sequences on the embedded chain (eth-tester, py-evm).

A model of the registry predicts every call's outcome; after every step the chain's views and
events must agree with the model and with each other.
"""
from __future__ import annotations

from eth_account import Account
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infra import chain
from tests.fixtures.chain import CLIENT_KEYS, ORG_KEY, cid_for, compact_cid, expect_revert

CALLERS = [ORG_KEY, *CLIENT_KEYS[:3]]  # the owner and three clients
ADDRESS = {key: Account.from_key(key).address for key in CALLERS}
INITIALLY_ENROLLED = [ADDRESS[key] for key in CLIENT_KEYS[:2]]  # the third starts outside the allowlist
# Callers are mostly the ones allowed to make the call, so that sequences get far; anyone sometimes.
owners = st.just(ORG_KEY) | st.sampled_from(CALLERS)
submitters = st.sampled_from(CLIENT_KEYS[:2]) | st.sampled_from(CALLERS)
MAX_SAMPLES = chain.DEFAULT_MAX_SAMPLES
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


# Digests are drawn, not hashed, so that edge values (all zeros, all ones) turn up: a client may
# submit any string as its CID, and its UpdateSubmitted event must carry it exactly as it was sent.
digests = st.sampled_from([bytes(32), b"\xff" * 32]) | st.binary(min_size=32, max_size=32)
compact_cids = st.builds(compact_cid, st.sampled_from([0x55, 0x70, 0x71]) | st.integers(0, 255), digests)
# One digit changed: still canonical-looking, or not canonical at all (padding bits, bad digit).
altered_cids = st.builds(lambda cid, i, digit: cid[:i] + digit + cid[i + 1:],
                         compact_cids, st.integers(1, 58), st.sampled_from(BASE32 + "A018"))
cids = compact_cids | st.one_of(  # half of them compact, the form clients really send
    altered_cids,
    st.builds(cid_for, st.binary(max_size=8)),
    st.just("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"),  # CIDv0
    st.text(max_size=64),  # anything at all, including ""
    st.text(alphabet="b", min_size=99, max_size=102),  # about the length cap
)
sample_counts = st.integers(1, 10_000) | st.sampled_from([0, 1, MAX_SAMPLES, MAX_SAMPLES + 1])
# Relative to the current round: mostly the current one, sometimes an old one or the next.
round_offsets = st.just(0) | st.integers(-2, 1)


def cid_errors(cid: str) -> set[str]:
    """The errors a CID argument meets: empty, or longer than the contract's cap."""
    length = len(cid.encode())
    return {"EmptyCid"} if length == 0 else {"CidTooLong"} if length > 100 else set()


def outcome(action) -> str | None:
    """None when `action` succeeds, else the name of the contract error it reverted with."""
    try:
        action()
    except chain.ContractError as error:
        return error.name
    return None


class RegistryMachine(RuleBasedStateMachine):
    @initialize()
    def deploy(self):
        self.w3 = chain.connect(chain.EMBEDDED)
        self.registry = chain.deploy_registry(self.w3, ORG_KEY)
        # Views name a sender, or eth-tester lists every account to guess one on each call (2.5x
        # slower); the chain is process-wide, so teardown puts the previous default back.
        self.previous_default_account = self.w3.eth.default_account
        self.w3.eth.default_account = ADDRESS[ORG_KEY]
        self.from_block = self.w3.eth.block_number
        self.enrolled: dict[str, int] = {}  # client -> the first round it may take part in
        for address in INITIALLY_ENROLLED:
            self.registry.add_client(ORG_KEY, address)
            self.enrolled[address] = 1
        self.rules = chain.RoundRules()
        self.current = 0
        self.rounds: dict[int, dict] = {}  # round -> base, model (None while open), submissions
        self.highest_round_seen = 0

    def round_id(self, offset: int) -> int:
        return max(self.current + offset, 0)

    def check(self, got: str | None, violated: set[str]) -> bool:
        """Assert the call's outcome: one of the errors it deserves (`violated`), or success when it
        deserves none. True when it succeeded."""
        if violated:
            assert got in violated, f"expected one of {sorted(violated)}, got {got or 'success'}"
        else:
            assert got is None, f"a valid call reverted with {got}"
        return got is None

    def owner_only(self, caller: str, violated: set[str]) -> set[str]:
        """A stranger to an owner-only call must meet NotOwner first, whatever else is wrong."""
        return {"NotOwner"} if caller != ORG_KEY else violated

    @rule(caller=owners, base=cids)
    def start_round(self, caller, base):
        violated = cid_errors(base)
        if self.current:  # after the first round, the open one is always the next to finalize
            violated.add("PreviousRoundOpen")
        got = outcome(lambda: self.registry.start_round(caller, base))
        if self.check(got, self.owner_only(caller, violated)):
            self.open_round(base)

    def open_round(self, base: str) -> None:
        """The model's side of a round opening under the current rules."""
        self.current += 1
        info = self.registry.round(self.current)
        expected_deadline = info.deadline and info.deadline - self.rules.duration  # its opening time
        assert (info.quorum, info.invited_share) == (self.rules.quorum, self.rules.invited_share)
        assert (info.deadline == 0) == (self.rules.duration == 0) and expected_deadline >= 0
        assert (info.seed == bytes(32)) == (self.rules.invited_share == chain.ALL_INVITED)
        self.rounds[self.current] = {"base": base, "model": None, "closed": False, "missed": False,
                                     "submissions": [], "info": info}

    def past_deadline(self, record: dict) -> bool:
        return record["info"].past_deadline(self.w3.eth.get_block("pending")["timestamp"])

    def invited(self, round_id: int, address: str) -> bool:
        record = self.rounds[round_id]
        return (self.enrolled.get(address, round_id + 1) <= round_id and record["info"].invites(address))

    @rule(caller=submitters, offset=round_offsets, cid=cids, samples=sample_counts)
    def submit_update(self, caller, offset, cid, samples):
        round_id, client = self.round_id(offset), ADDRESS[caller]
        record = self.rounds.get(round_id)
        violated = set()
        violated |= cid_errors(cid)
        if samples == 0:
            violated.add("ZeroSamples")
        if samples > MAX_SAMPLES:
            violated.add("TooManySamples")
        if client not in self.enrolled:
            violated.add("NotEnrolled")
        if record is None or record["closed"]:
            violated.add("RoundNotOpen")
        else:
            if self.past_deadline(record):
                violated.add("DeadlinePassed")
            if not self.invited(round_id, client):
                violated.add("NotInvited")
            if any(s[0] == client for s in record["submissions"]):
                violated.add("AlreadySubmitted")
        got = outcome(lambda: self.registry.submit_update(caller, round_id, cid, samples))
        if self.check(got, violated):
            record["submissions"].append((client, cid, samples))

    def round_is_open(self) -> bool:
        return bool(self.current) and not self.rounds[self.current]["closed"]

    # The calls honest clients make, so that open rounds fill up and clients come back for more.
    @precondition(round_is_open)
    @rule(caller=st.sampled_from(CLIENT_KEYS[:3]), cid=compact_cids, samples=st.integers(1, 10_000))
    def submit_to_the_open_round(self, caller, cid, samples):
        self.submit_update(caller, 0, cid, samples)

    @rule(caller=owners, offset=round_offsets)
    def close_round(self, caller, offset):
        round_id = self.round_id(offset)
        record = self.rounds.get(round_id)
        violated = {"RoundNotOpen"} if record is None or record["closed"] else set()
        if not violated and len(record["submissions"]) < record["info"].quorum and not self.past_deadline(record):
            violated.add("QuorumNotMet")
        if self.check(outcome(lambda: self.registry.close_round(caller, round_id)),
                      self.owner_only(caller, violated)):
            record["closed"] = True

    @rule(caller=owners, offset=round_offsets)
    def restart_round(self, caller, offset):
        round_id = self.round_id(offset)
        record = self.rounds.get(round_id)
        if record is None:
            violated = {"RoundNotOpen"}
        elif record["model"] is not None:
            violated = {"RoundAlreadyFinalized"}
        elif len(record["submissions"]) >= record["info"].quorum or not self.past_deadline(record):
            violated = {"RoundNotMissed"}
        else:
            violated = set()
        if self.check(outcome(lambda: self.registry.restart_round(caller, round_id)),
                      self.owner_only(caller, violated)):
            record.update(closed=True, missed=True, model=record["base"])
            self.open_round(record["base"])

    @rule(caller=owners, duration=st.sampled_from([0, 0, 30, 3600]), quorum=st.integers(0, 3),
          share=st.sampled_from([chain.ALL_INVITED, chain.ALL_INVITED, 5000, 1, 0, chain.ALL_INVITED + 1]))
    def set_round_rules(self, caller, duration, quorum, share):
        violated = {"ZeroQuorum"} if quorum == 0 else set()
        if not 1 <= share <= chain.ALL_INVITED:
            violated.add("InvalidInvitedShare")
        rules = chain.RoundRules(duration, quorum, share)
        if self.check(outcome(lambda: self.registry.set_round_rules(caller, rules)), self.owner_only(caller, violated)):
            self.rules = rules
            assert self.registry.round_rules() == rules

    @rule(seconds=st.sampled_from([31, 3601]))
    def time_passes(self, seconds):
        self.w3.provider.ethereum_tester.time_travel(self.w3.eth.get_block("pending")["timestamp"] + seconds)

    @rule(caller=owners, offset=round_offsets, model=cids)
    def finalize_round(self, caller, offset, model):
        round_id = self.round_id(offset)
        record = self.rounds.get(round_id)
        violated = cid_errors(model)
        if record is None:
            violated.add("RoundNotOpen")
        elif record["model"] is not None:
            violated.add("RoundAlreadyFinalized")
        elif not record["closed"]:
            violated.add("RoundNotClosed")
        elif len(record["submissions"]) < record["info"].quorum:
            violated.add("QuorumNotMet")
        got = outcome(lambda: self.registry.finalize_round(caller, round_id, model))
        if self.check(got, self.owner_only(caller, violated)):
            record["model"] = model
            self.open_round(model)  # the next round opens from the model

    @rule(caller=owners, client=st.sampled_from(CALLERS[1:]))
    def add_client(self, caller, client):
        address = ADDRESS[client]
        violated = {"AlreadyEnrolled"} if address in self.enrolled else set()
        if self.check(outcome(lambda: self.registry.add_client(caller, address)),
                      self.owner_only(caller, violated)):
            self.enrolled[address] = self.current + 1  # from the next round to open
            assert self.registry.enrolled_from(address) == self.current + 1

    @rule(caller=owners, client=st.sampled_from(CALLERS[1:]))
    def remove_client(self, caller, client):
        address = ADDRESS[client]
        violated = {"NotEnrolled"} if address not in self.enrolled else set()
        if self.check(outcome(lambda: self.registry.remove_client(caller, address)),
                      self.owner_only(caller, violated)):
            del self.enrolled[address]

    @invariant()
    def views_match_the_model(self):
        current = self.registry.current_round()
        assert current >= self.highest_round_seen, "the current round went back"
        self.highest_round_seen = current
        assert current == self.current
        if current:
            record = self.rounds[current]
            on_chain = self.registry.round(current)
            assert (on_chain.base_cid, on_chain.model_cid, on_chain.closed, on_chain.finalized,
                    on_chain.submissions) == (record["base"], record["model"] or "", record["closed"],
                                              record["model"] is not None, len(record["submissions"]))
            assert [(s.client, s.cid, s.num_samples) for s in self.registry.submissions(current)] \
                == record["submissions"]
            submitted_by = {client for client, _, _ in record["submissions"]}
            for address in map(ADDRESS.get, CALLERS[1:]):
                assert self.registry.has_submitted(current, address) == (address in submitted_by), \
                    f"hasSubmitted({current}, {address}) disagrees with the submissions {record['submissions']}"
                assert self.registry.current_round_for(address) == chain.ClientRound(
                    current, record["base"], not record["closed"] and not self.past_deadline(record),
                    address in submitted_by, self.invited(current, address), record["info"].deadline)
                assert self.registry.is_invited(current, address) == self.invited(current, address)
        finalized = [r for r, record in self.rounds.items() if record["model"] is not None]
        latest = max(finalized, default=0)
        assert self.registry.latest_model() == (latest, self.rounds[latest]["model"] if latest else "")

    def teardown(self):
        """Events are append-only, so checking them once at the end covers every step."""
        if not hasattr(self, "previous_default_account"):  # the example failed while deploying
            return
        try:
            self.check_events()
        finally:
            self.w3.eth.default_account = self.previous_default_account

    def check_events(self):
        started = [(e["args"]["round"], e["args"]["baseCid"], e["args"]["deadline"], e["args"]["quorum"])
                   for e in self.registry.events("RoundStarted", self.from_block)]
        assert started == [(r, record["base"], record["info"].deadline, record["info"].quorum)
                           for r, record in self.rounds.items()]
        missed = [e["args"]["round"] for e in self.registry.events("RoundMissedQuorum", self.from_block)]
        assert missed == [r for r, record in self.rounds.items() if record["missed"]]
        submitted: dict[int, list[tuple]] = {}
        for event in self.registry.events("UpdateSubmitted", self.from_block):
            args = event["args"]
            submitted.setdefault(args["round"], []).append((args["client"], args["cid"], args["numSamples"]))
        assert set(submitted) <= set(self.rounds), "an update was accepted for a round that never opened"
        finalized = {e["args"]["round"]: (e["args"]["modelCid"], e["args"]["submissionCount"])
                     for e in self.registry.events("RoundFinalized", self.from_block)}
        closed = {e["args"]["round"]: e["args"]["submissionCount"]
                  for e in self.registry.events("RoundClosed", self.from_block)}
        assert closed == {r: len(record["submissions"]) for r, record in self.rounds.items() if record["closed"]}
        for round_id, record in self.rounds.items():
            from_events = submitted.get(round_id, [])
            clients = [client for client, _, _ in from_events]
            assert len(clients) == len(set(clients)), f"a client submitted twice in round {round_id}"
            on_chain = self.registry.round(round_id)
            assert on_chain.submissions == len(from_events)
            assert [(s.client, s.cid, s.num_samples) for s in self.registry.submissions(round_id)] \
                == from_events == record["submissions"]
            # What the chain stores of a round's submissions (who, how many) agrees with its events.
            for address in map(ADDRESS.get, CALLERS[1:]):
                assert self.registry.has_submitted(round_id, address) == (address in clients), \
                    f"hasSubmitted({round_id}, {address}) disagrees with the events {from_events}"
            assert (on_chain.base_cid, on_chain.finalized) == (record["base"], record["model"] is not None)
            if record["model"] is not None and not record["missed"]:
                assert finalized[round_id] == (on_chain.model_cid, on_chain.submissions)
        ended = [r for r, record in self.rounds.items() if record["model"] is not None]  # finalized or missed
        last = max(ended, default=0)
        assert self.registry.latest_model() == (last, self.rounds[last]["model"] if last else "")


RegistryMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_registry_invariants = RegistryMachine.TestCase


def test_a_cid_with_an_all_zero_digest_still_counts_as_the_clients_submission():
    """The machine above found this when the contract stored CIDs by their digest: "submitted" must
    not be marked by the CID alone, or an update whose CID decodes to a zero digest leaves no mark
    and the client can submit again. Kept: any CID a client sends must leave the mark."""
    registry = chain.deploy_registry(chain.connect(chain.EMBEDDED), ORG_KEY)
    client_key, client = CLIENT_KEYS[0], ADDRESS[CLIENT_KEYS[0]]
    registry.add_client(ORG_KEY, client)
    registry.start_round(ORG_KEY, cid_for("base"))
    zero_digest = compact_cid(0x55, bytes(32))  # "bafkreiaaaa...": any client may send this string
    registry.submit_update(client_key, 1, zero_digest, 10)
    assert registry.has_submitted(1, client)
    expect_revert("AlreadySubmitted", lambda: registry.submit_update(client_key, 1, cid_for("again"), 5))
    assert registry.submissions(1) == [chain.Submission(client, zero_digest, 10)]
