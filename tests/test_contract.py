"""RoundRegistry and the chain layer on the embedded chain (eth-tester, py-evm)."""
from __future__ import annotations

import json
import threading

import pytest
from eth_account import Account

from infra import chain
from tests.fixtures.chain import (
    CLIENT_KEYS,
    CLIENTS,
    DAG_PB,
    ORG_KEY,
    check_round_lifecycle,
    cid_for,
    close_and_finalize,
    expect_revert,
)

BASE = cid_for("base")


def test_embedded_chain_is_cached_and_funds_the_ganache_accounts(w3):
    assert chain.connect(chain.EMBEDDED) is w3
    for key in chain.DEV_KEYS:
        assert w3.eth.get_balance(Account.from_key(key).address) > 10**18


def test_round_lifecycle_with_events(w3):
    check_round_lifecycle(w3)


def test_unauthorized_and_invalid_calls_revert_with_named_errors(registry):
    stranger = CLIENT_KEYS[5]
    cid = cid_for("update")
    expect_revert("NotOwner", lambda: registry.start_round(CLIENT_KEYS[0], cid))
    expect_revert("NotOwner", lambda: registry.finalize_round(CLIENT_KEYS[0], 1, cid))
    expect_revert("NotOwner", lambda: registry.add_client(CLIENT_KEYS[0], CLIENTS[5]))
    error = expect_revert("NotEnrolled", lambda: registry.submit_update(stranger, 1, cid, 10))
    assert error.args == (Account.from_key(stranger).address,)
    expect_revert("EmptyCid", lambda: registry.submit_update(CLIENT_KEYS[0], 1, "", 10))
    expect_revert("ZeroSamples", lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid, 0))
    error = expect_revert("TooManySamples", lambda: registry.submit_update(
        CLIENT_KEYS[0], 1, cid, chain.DEFAULT_MAX_SAMPLES + 1))
    assert error.fields == {"numSamples": chain.DEFAULT_MAX_SAMPLES + 1, "maxSamples": chain.DEFAULT_MAX_SAMPLES}
    error = expect_revert("CidTooLong", lambda: registry.submit_update(CLIENT_KEYS[0], 1, "b" * 101, 10))
    assert error.fields == {"length": 101, "maxLength": 100}
    expect_revert("CidTooLong", lambda: registry.start_round(ORG_KEY, "b" * 101))
    expect_revert("NotOwner", lambda: registry.close_round(CLIENT_KEYS[0], 1))
    expect_revert("RoundNotOpen", lambda: registry.close_round(ORG_KEY, 2))
    expect_revert("RoundNotOpen", lambda: registry.submit_update(CLIENT_KEYS[0], 2, cid, 10))  # future
    expect_revert("PreviousRoundOpen", lambda: registry.start_round(ORG_KEY, cid))
    expect_revert("EmptyCid", lambda: registry.start_round(ORG_KEY, ""))
    expect_revert("RoundNotOpen", lambda: registry.finalize_round(ORG_KEY, 2, cid))

    registry.submit_update(CLIENT_KEYS[0], 1, cid, 10)
    error = expect_revert("AlreadySubmitted",
                          lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("again"), 5))
    assert error.fields == {"round": 1, "client": CLIENTS[0]}
    assert str(error) == f"RoundRegistry reverted: AlreadySubmitted(round=1, client={CLIENTS[0]})"

    expect_revert("EmptyCid", lambda: registry.finalize_round(ORG_KEY, 1, ""))
    expect_revert("RoundNotClosed", lambda: registry.finalize_round(ORG_KEY, 1, cid_for("model")))
    registry.close_round(ORG_KEY, 1)
    expect_revert("RoundNotOpen", lambda: registry.submit_update(CLIENT_KEYS[1], 1, cid, 10))  # closed
    expect_revert("CidTooLong", lambda: registry.finalize_round(ORG_KEY, 1, "b" * 101))
    registry.finalize_round(ORG_KEY, 1, cid_for("model"))
    expect_revert("RoundAlreadyFinalized", lambda: registry.finalize_round(ORG_KEY, 1, cid_for("model")))
    expect_revert("RoundNotOpen", lambda: registry.submit_update(CLIENT_KEYS[1], 1, cid, 10))  # finalized
    assert registry.round(1).submissions == 1
    # Finalizing opened round 2 from the model; only that one can be finalized now.
    assert registry.current_round() == 2 and registry.round(2).base_cid == cid_for("model")
    expect_revert("PreviousRoundOpen", lambda: registry.start_round(ORG_KEY, cid))
    expect_revert("RoundNotOpen", lambda: registry.finalize_round(ORG_KEY, 3, cid))


def test_the_sample_cap_is_set_at_deployment(w3):
    registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True, max_samples=500)
    assert registry.max_samples() == 500
    registry.start_round(ORG_KEY, BASE)
    expect_revert("TooManySamples", lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 501))
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 500)
    expect_revert("ZeroMaxSamples", lambda: chain.deploy_registry(w3, ORG_KEY, max_samples=0))


def test_a_revert_is_named_whether_the_estimate_or_the_mined_transaction_meets_it(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    # First addClient of this contract: its gas is estimated, and the estimate meets the revert.
    expect_revert("NotOwner", lambda: registry.add_client(CLIENT_KEYS[0], CLIENTS[1]))
    registry.add_client(ORG_KEY, CLIENTS[0])  # now addClient's gas limit is cached
    failed_before = w3.eth.block_number
    # No estimate now: the transaction is mined, fails, and its replay names the error.
    error = expect_revert("AlreadyEnrolled", lambda: registry.add_client(ORG_KEY, CLIENTS[0]))
    assert error.args == (CLIENTS[0],)
    assert w3.eth.get_block(failed_before + 1)["transactions"], "the failing transaction was mined"


def test_a_cached_gas_limit_that_runs_out_is_estimated_anew(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    registry.add_client(ORG_KEY, CLIENTS[0])
    (function,) = [f for f in chain._gas_limits if f[:2] == (chain.EMBEDDED, registry.address)]
    chain._gas_limits[function] = 25_000  # below what addClient needs
    tx = registry.add_client(ORG_KEY, CLIENTS[1])
    assert tx.gas_used > 25_000 and registry.is_client(CLIENTS[1])
    assert chain._gas_limits[function] > tx.gas_used


def test_allowlist_management(registry):
    expect_revert("AlreadyEnrolled", lambda: registry.add_client(ORG_KEY, CLIENTS[0]))
    expect_revert("ZeroAddress", lambda: registry.add_client(ORG_KEY, "0x" + "00" * 20))
    expect_revert("NotEnrolled", lambda: registry.remove_client(ORG_KEY, CLIENTS[7]))
    registry.remove_client(ORG_KEY, CLIENTS[0])
    assert not registry.is_client(CLIENTS[0])
    expect_revert("NotEnrolled", lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 1))
    assert [e["args"]["client"] for e in registry.events("ClientRemoved")][-1] == CLIENTS[0]


def test_open_enrolment_lets_any_account_submit_once(w3):
    registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
    assert registry.open_enrolment
    registry.start_round(ORG_KEY, BASE)
    registry.submit_update(CLIENT_KEYS[9], 1, cid_for("anyone"), 3)
    assert registry.has_submitted(1, CLIENTS[9]) and not registry.is_client(CLIENTS[9])
    expect_revert("AlreadySubmitted", lambda: registry.submit_update(CLIENT_KEYS[9], 1, cid_for("x"), 3))
    expect_revert("NotOwner", lambda: registry.finalize_round(CLIENT_KEYS[9], 1, cid_for("x")))


def test_submissions_are_read_from_events_in_submission_order(registry):
    for k in (2, 0, 1):
        registry.submit_update(CLIENT_KEYS[k], 1, cid_for(f"update {k}"), 10 + k)
    everything = registry.submissions(1)
    assert everything == [chain.Submission(CLIENTS[k], cid_for(f"update {k}"), 10 + k) for k in (2, 0, 1)]
    # The chain keeps who submitted and how many; the event is each submission's record.
    assert registry.round(1).submissions == len(everything)
    assert all(registry.has_submitted(1, s.client) for s in everything)
    assert registry.logged_submissions(registry.round(1)) == everything
    assert registry.submissions(7) == []  # a round not started
    close_and_finalize(registry, 1, cid_for("model"))
    registry.submit_update(CLIENT_KEYS[0], 2, cid_for("round 2"), 5)  # another round's: not round 1's
    assert registry.submissions(1) == everything
    assert registry.submissions(2) == [chain.Submission(CLIENTS[0], cid_for("round 2"), 5)]
    abi = {entry.get("name") for entry in registry.contract.abi}
    assert "getSubmissions" not in abi and {"hasSubmitted", "UpdateSubmitted"} <= abi


# CIDs of every form, canonical CIDv1 or not: each must come back from its event exactly as sent.
OTHER_CIDS = [
    "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",  # CIDv0
    cid_for("upper").upper(),  # base32upper multibase
    cid_for("padding")[:-1] + "b",  # non-zero padding bits: not what an encoder produces
    cid_for("bad digit")[:30] + "1" + cid_for("bad digit")[31:],
    cid_for("bad digit")[:40] + "{" + cid_for("bad digit")[41:],
    cid_for("bad digit")[:58] + "8",
    cid_for("short")[:-1],
    cid_for("long") + "a",
    "bb" + cid_for("wrong version")[2:],
    cid_for("codec 0x80", 0x80),
    cid_for("codec 0", 0),
    "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",  # dag-cbor
    "x",
]


def test_every_cid_reads_back_exactly_and_costs_the_same(w3):
    registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
    canonical = [cid_for(bytes([i]) * i, codec) for i in range(8) for codec in (0x55, DAG_PB)]
    gas = {}
    registry.start_round(ORG_KEY, BASE)
    for round_id, cid in enumerate(canonical + OTHER_CIDS + ["b" * 100], start=1):
        gas[cid] = registry.submit_update(CLIENT_KEYS[0], round_id, cid, 1).gas_used
        assert registry.submissions(round_id) == [chain.Submission(CLIENTS[0], cid, 1)]
        assert registry.has_submitted(round_id, CLIENTS[0])
        close_and_finalize(registry, round_id, cid)
    # Nothing about the CID is stored: its cost is its calldata and log bytes, whatever its form.
    assert max(gas.values()) <= 60_000
    assert max(gas[cid] for cid in canonical) - min(gas[cid] for cid in canonical) < 100
    assert max(gas[cid] for cid in OTHER_CIDS if len(cid) == 59) - min(gas[cid] for cid in canonical) < 100


def test_submission_gas_does_not_grow_with_clients_or_rounds(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    for address in CLIENTS[:8]:
        registry.add_client(ORG_KEY, address)
    used = []
    registry.start_round(ORG_KEY, cid_for("base"))
    for round_id in (1, 2, 3):
        used += [registry.submit_update(key, round_id, cid_for(f"{round_id} {k}"), 100).gas_used
                 for k, key in enumerate(CLIENT_KEYS[:8])]
        close_and_finalize(registry, round_id, cid_for(f"model {round_id}"))
    assert max(used) <= 60_000 and max(used) - min(used) <= 200  # calldata varies with its zero bytes only


def test_threads_sharing_one_key_never_reuse_a_nonce(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    errors = []

    def enrol(address):
        try:
            registry.add_client(ORG_KEY, address)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=enrol, args=(address,)) for address in CLIENTS[:6]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and all(registry.is_client(address) for address in CLIENTS[:6])


def test_deployment_record_and_truffle_artifact(w3, tmp_path):
    registry = chain.deploy_registry(w3, ORG_KEY)
    record = tmp_path / "nested" / "deployments.json"
    missing_artifact = tmp_path / "none.json"
    assert chain.find_deployment(w3, record, artifact=missing_artifact) is None
    chain.record_deployment(record, w3, registry.address.lower())
    assert json.loads(record.read_text())[str(w3.eth.chain_id)]["address"] == registry.address
    assert chain.find_deployment(w3, record, artifact=missing_artifact) == registry.address
    assert list(record.parent.iterdir()) == [record]  # no temporary file left behind

    # An address without code (a reset chain) is not a deployment; Truffle's artifact is the fallback.
    chain.record_deployment(record, w3, "0x" + "12" * 20)
    assert chain.find_deployment(w3, record, artifact=missing_artifact) is None
    artifact = tmp_path / "RoundRegistry.json"
    artifact.write_text(json.dumps({"networks": {str(w3.net.version): {"address": registry.address}}}))
    assert chain.find_deployment(w3, record, artifact=artifact) == registry.address


def test_an_absent_node_is_reported_as_unavailable():
    with pytest.raises(chain.ChainUnavailable, match="127.0.0.1:9"):
        chain.connect("http://127.0.0.1:9")


def time_travel(w3, seconds: int) -> None:
    """Move the embedded chain's clock `seconds` ahead: the next block is mined that much later."""
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("pending")["timestamp"] + seconds)


def test_a_round_keeps_its_deadline_and_quorum_and_a_missed_round_restarts_from_its_base(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    for address in CLIENTS[:3]:
        registry.add_client(ORG_KEY, address)
    expect_revert("ZeroQuorum", lambda: registry.set_round_rules(ORG_KEY, chain.RoundRules(30, 0)))
    error = expect_revert("InvalidInvitedShare", lambda: registry.set_round_rules(
        ORG_KEY, chain.RoundRules(30, 1, chain.ALL_INVITED + 1)))
    assert error.fields == {"invitedShare": chain.ALL_INVITED + 1}
    expect_revert("NotOwner", lambda: registry.set_round_rules(CLIENT_KEYS[0], chain.RoundRules(30, 2)))
    registry.set_round_rules(ORG_KEY, chain.RoundRules(30, 2))
    assert registry.round_rules() == chain.RoundRules(30, 2)
    started = registry.start_round(ORG_KEY, BASE)
    opened_at = w3.eth.get_block(started.block_number)["timestamp"]
    info = registry.round(1)
    assert (info.deadline, info.quorum) == (opened_at + 30, 2)
    assert registry.events("RoundStarted")[-1]["args"] == {"round": 1, "baseCid": BASE, "deadline": opened_at + 30,
                                                          "quorum": 2, "invitedShare": chain.ALL_INVITED,
                                                          "seed": bytes(32)}

    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u0"), 10)
    error = expect_revert("QuorumNotMet", lambda: registry.close_round(ORG_KEY, 1))
    assert error.fields == {"round": 1, "submissionCount": 1, "quorum": 2}
    expect_revert("RoundNotMissed", lambda: registry.restart_round(ORG_KEY, 1))  # its deadline is ahead
    time_travel(w3, 31)
    error = expect_revert("DeadlinePassed", lambda: registry.submit_update(CLIENT_KEYS[1], 1, cid_for("u1"), 10))
    assert error.fields == {"round": 1, "deadline": opened_at + 30}
    assert not registry.current_round_for(CLIENTS[1]).open
    expect_revert("NotOwner", lambda: registry.restart_round(CLIENT_KEYS[0], 1))
    registry.restart_round(ORG_KEY, 1)
    assert registry.events("RoundMissedQuorum")[-1]["args"] == {"round": 1, "submissionCount": 1, "quorum": 2}
    missed = registry.round(1)
    assert (missed.closed, missed.finalized, missed.model_cid) == (True, True, BASE)
    assert registry.current_round() == 2 and registry.round(2).base_cid == BASE
    expect_revert("RoundAlreadyFinalized", lambda: registry.restart_round(ORG_KEY, 1))

    # Round 2 meets its quorum: it may close before its deadline, and cannot be restarted.
    for key in CLIENT_KEYS[:2]:
        registry.submit_update(key, 2, cid_for(f"round 2 {key}"), 10)
    time_travel(w3, 31)
    expect_revert("RoundNotMissed", lambda: registry.restart_round(ORG_KEY, 2))
    registry.close_round(ORG_KEY, 2)
    registry.finalize_round(ORG_KEY, 2, cid_for("model 2"))
    assert registry.round(3).base_cid == cid_for("model 2")


def test_a_round_closed_below_its_quorum_after_its_deadline_is_restarted_not_finalized(w3):
    registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
    registry.set_round_rules(ORG_KEY, chain.RoundRules(30, 2))
    registry.start_round(ORG_KEY, BASE)
    time_travel(w3, 31)
    registry.close_round(ORG_KEY, 1)  # nobody came: closing is allowed once the deadline has passed
    error = expect_revert("QuorumNotMet", lambda: registry.finalize_round(ORG_KEY, 1, cid_for("model")))
    assert error.fields == {"round": 1, "submissionCount": 0, "quorum": 2}
    registry.restart_round(ORG_KEY, 1)
    assert registry.current_round() == 2


def test_a_client_enrolled_during_a_round_takes_part_from_the_next(registry):
    late, late_key = CLIENTS[5], CLIENT_KEYS[5]
    registry.add_client(ORG_KEY, late)
    assert registry.enrolled_from(late) == 2 and registry.enrolled_from(CLIENTS[0]) == 1
    assert registry.events("ClientAdded")[-1]["args"] == {"client": late, "fromRound": 2}
    assert not registry.is_invited(1, late) and not registry.current_round_for(late).invited
    error = expect_revert("NotInvited", lambda: registry.submit_update(late_key, 1, cid_for("late"), 10))
    assert error.fields == {"round": 1, "client": late}
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 10)
    close_and_finalize(registry, 1, cid_for("model"))
    assert registry.is_invited(2, late)
    registry.submit_update(late_key, 2, cid_for("late"), 10)


def test_a_share_of_the_clients_is_invited_by_a_draw_anyone_can_check(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    for address in CLIENTS:
        registry.add_client(ORG_KEY, address)
    registry.set_round_rules(ORG_KEY, chain.RoundRules(invited_share=5000))
    started = registry.start_round(ORG_KEY, BASE)
    info = registry.round(1)
    assert info.invited_share == 5000 and info.seed == w3.eth.get_block(started.block_number - 1)["hash"]
    drawn = [address for address in CLIENTS if info.invites(address)]
    assert [registry.is_invited(1, address) for address in CLIENTS] == [a in drawn for a in CLIENTS]
    assert 0 < len(drawn) < len(CLIENTS), "half of 19 clients: all or none is a broken draw"
    for key, address in zip(CLIENT_KEYS, CLIENTS):
        if address in drawn:
            registry.submit_update(key, 1, cid_for(address), 10)
        else:
            expect_revert("NotInvited", lambda: registry.submit_update(key, 1, cid_for(address), 10))
    assert registry.round(1).submissions == len(drawn)
