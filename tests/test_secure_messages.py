"""The secure-aggregation stages' messages: who the contract lets post what when, and how the
message layer (infra.secure_round) reads keys, rosters and share files written by an attacker."""
from __future__ import annotations

import orjson
import pytest

from infra import chain
from infra.chain import MessageKind
from infra.secure_round import (
    REVEAL_FORMAT,
    SHARES_FORMAT,
    SecureRoundView,
    decode_shares_file,
    encode_shares_file,
    encode_unmask,
    pack_roster,
    read_keys,
    read_roster,
    read_unmask,
    signed_keys,
    unmask_roster_problem,
)
from processor import secagg
from tests.fixtures.chain import CLIENT_KEYS, CLIENTS, ORG_KEY, cid_for, expect_revert


def keys_of(registry: chain.Registry, k: int, round_id: int = 1, mask: secagg.KeyPair | None = None
            ) -> tuple[bytes, secagg.KeyPair, secagg.KeyPair]:
    encryption, mask = secagg.new_key_pair(), mask or secagg.new_key_pair()
    commitment = secagg.seed_commitment(bytes(32), b"a round's context")
    return (signed_keys(CLIENT_KEYS[k], registry.address, round_id, encryption.public, mask.public, commitment),
            encryption, mask)


def test_each_kind_of_message_is_allowed_only_to_its_sender_and_stage(registry):
    payload, _, _ = keys_of(registry, 0)
    registry.post_round_message(CLIENT_KEYS[0], 1, MessageKind.KEYS, payload)
    expect_revert("NotInvited", lambda: registry.post_round_message(CLIENT_KEYS[5], 1, MessageKind.KEYS, payload))
    expect_revert("NotOwner", lambda: registry.post_round_message(
        CLIENT_KEYS[0], 1, MessageKind.KEY_ROSTER, pack_roster(CLIENTS[:2])))
    expect_revert("EmptyMessage", lambda: registry.post_round_message(CLIENT_KEYS[0], 1, MessageKind.SHARES, b""))
    expect_revert("MessageTooLong", lambda: registry.post_round_message(
        CLIENT_KEYS[0], 1, MessageKind.SHARES, bytes(4001)))
    expect_revert("RoundNotOpen", lambda: registry.post_round_message(CLIENT_KEYS[0], 2, MessageKind.KEYS, payload))
    # a reveal before the round closes would hand out a secret while its owner may still submit
    expect_revert("WrongStage", lambda: registry.post_round_message(CLIENT_KEYS[0], 1, MessageKind.REVEAL, b"bafy"))
    registry.post_round_message(ORG_KEY, 1, MessageKind.KEY_ROSTER, pack_roster(CLIENTS[:2]))
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("masked"), 5)
    registry.close_round(ORG_KEY, 1)
    expect_revert("WrongStage", lambda: registry.post_round_message(CLIENT_KEYS[1], 1, MessageKind.KEYS, payload))
    expect_revert("WrongStage", lambda: registry.post_round_message(
        ORG_KEY, 1, MessageKind.MASK_ROSTER, pack_roster(CLIENTS[:2])))
    # the unmasking stages: the survivors named by the organization alone, once the round is closed
    expect_revert("NotOwner", lambda: registry.post_round_message(
        CLIENT_KEYS[0], 1, MessageKind.UNMASK_ROSTER, pack_roster(CLIENTS[:1])))
    registry.post_round_message(ORG_KEY, 1, MessageKind.UNMASK_ROSTER, pack_roster(CLIENTS[:1]))
    registry.post_round_message(CLIENT_KEYS[0], 1, MessageKind.UNMASK, bytes(32))
    expect_revert("NotOwner", lambda: registry.post_round_message(
        CLIENT_KEYS[0], 1, MessageKind.RECOVERY_ROSTER, pack_roster(CLIENTS[:1])))
    registry.post_round_message(CLIENT_KEYS[0], 1, MessageKind.REVEAL, cid_for("reveal").encode())
    registry.finalize_round(ORG_KEY, 1, cid_for("model"))
    expect_revert("RoundNotOpen", lambda: registry.post_round_message(
        CLIENT_KEYS[0], 1, MessageKind.REVEAL, cid_for("reveal").encode()))
    kinds = [(m.sender, m.kind) for m in registry.round_messages(registry.round(1))]
    assert kinds == [(CLIENTS[0], MessageKind.KEYS), (registry.owner, MessageKind.KEY_ROSTER),
                     (registry.owner, MessageKind.UNMASK_ROSTER), (CLIENTS[0], MessageKind.UNMASK),
                     (CLIENTS[0], MessageKind.REVEAL)]


def test_the_unmasking_stages_wait_for_the_round_to_close(registry):
    for kind, key in ((MessageKind.UNMASK_ROSTER, ORG_KEY), (MessageKind.RECOVERY_ROSTER, ORG_KEY),
                      (MessageKind.UNMASK, CLIENT_KEYS[0])):
        expect_revert("WrongStage", lambda: registry.post_round_message(key, 1, kind, pack_roster(CLIENTS[:1])))


def test_the_view_takes_each_senders_first_valid_message_and_says_why_others_are_ignored(registry):
    first, encryption, mask = keys_of(registry, 0)
    second, _, _ = keys_of(registry, 0)
    forged, _, _ = keys_of(registry, 2)  # client 2's signature, posted by client 1
    other_round, _, _ = keys_of(registry, 1, round_id=7)
    small_order, _, _ = keys_of(registry, 2, mask=secagg.KeyPair(secret=bytes(32), public=bytes(32)))
    for key, payload in ((CLIENT_KEYS[0], first), (CLIENT_KEYS[0], second), (CLIENT_KEYS[1], forged),
                         (CLIENT_KEYS[1], other_round), (CLIENT_KEYS[1], b"\x01" * 161),
                         (CLIENT_KEYS[2], small_order)):
        registry.post_round_message(key, 1, MessageKind.KEYS, payload)
    registry.post_round_message(CLIENT_KEYS[2], 1, MessageKind.SHARES, b"not a cid!")
    registry.post_round_message(CLIENT_KEYS[2], 1, MessageKind.SHARES, cid_for("shares").encode())
    registry.post_round_message(ORG_KEY, 1, MessageKind.KEY_ROSTER, pack_roster([CLIENTS[0]]))
    view = SecureRoundView.read(registry.round_messages(registry.round(1)), registry.owner, registry.address, 1)
    assert view.keys == {CLIENTS[0]: read_keys(first, CLIENTS[0], registry.address, 1)}
    assert view.keys[CLIENTS[0]].mask == mask.public and view.keys[CLIENTS[0]].encryption == encryption.public
    assert view.shares == {CLIENTS[2]: cid_for("shares")}
    assert view.key_roster == [CLIENTS[0]] and view.mask_roster is None
    # client 1's three: another's signature, a signature for round 7, and bytes that are no signature
    ignored_keys = [reason for reason in view.ignored if reason.startswith(f"keys from {CLIENTS[1]}")]
    assert len(ignored_keys) == 3
    assert sum(f"not by their sender {CLIENTS[1]}" in reason for reason in ignored_keys) >= 2
    assert any(reason.startswith(f"shares from {CLIENTS[2]}: not a CID") for reason in view.ignored)
    # a mask key that agrees the all-zero secret with anyone: no peer could mask against it
    assert CLIENTS[2] not in view.keys
    assert any(reason.startswith(f"keys from {CLIENTS[2]}: the mask key is not a valid") for reason in view.ignored)
    assert view.excluded() == []  # no mask roster yet: no one is dropped


def test_rosters_and_share_files_refuse_malformed_bytes():
    assert read_roster(pack_roster(list(reversed(CLIENTS[:3])))) == sorted(CLIENTS[:3], key=str.lower)
    for bad in (b"", bytes(19), pack_roster(CLIENTS[:1]) * 2):
        with pytest.raises(ValueError):
            read_roster(bad)
    shares = {CLIENTS[1]: b"\x01\x02", CLIENTS[2]: b"\xff"}
    data = encode_shares_file(SHARES_FORMAT, 3, CLIENTS[0], shares)
    assert decode_shares_file(data, SHARES_FORMAT, 3, CLIENTS[0]) == shares
    hostile = [data[:-1], b"[" * 5000, orjson.dumps({"format": SHARES_FORMAT, "round": 3, "client": CLIENTS[0],
                                                     "shares": {CLIENTS[1]: "zz"}}),
               orjson.dumps({"format": SHARES_FORMAT, "round": 3, "client": CLIENTS[0], "shares": {}, "x": 1}),
               b" " * 300_000]
    for bad in hostile:
        with pytest.raises(ValueError):
            decode_shares_file(bad, SHARES_FORMAT, 3, CLIENTS[0])
    for fmt, round_id, client in ((REVEAL_FORMAT, 3, CLIENTS[0]), (SHARES_FORMAT, 4, CLIENTS[0]),
                                  (SHARES_FORMAT, 3, CLIENTS[1])):
        with pytest.raises(ValueError, match="not a"):
            decode_shares_file(data, fmt, round_id, client)


def test_a_client_refuses_an_unmask_roster_the_chain_does_not_back():
    """What each client checks before it gives anything away of the others."""
    mask_roster = CLIENTS[:6]
    groups = [mask_roster[:3], mask_roster[3:]]
    view = SecureRoundView(mask_roster=mask_roster, unmask_roster=CLIENTS[:3] + CLIENTS[3:5])
    submitted = set(CLIENTS[:6])
    assert unmask_roster_problem(view, submitted, groups, threshold=2) is None
    assert view.excluded() == [CLIENTS[5]]
    # a survivor that never submitted: its seed would be given away with its pairwise masks
    assert "submitted no update" in unmask_roster_problem(view, submitted - {CLIENTS[4]}, groups, threshold=2)
    # a group summed with fewer than the threshold: its sum would be one client's update
    alone = SecureRoundView(mask_roster=mask_roster, unmask_roster=CLIENTS[:3] + CLIENTS[3:4])
    assert "fewer than the threshold" in unmask_roster_problem(alone, submitted, groups, threshold=2)
    outsider = SecureRoundView(mask_roster=mask_roster, unmask_roster=CLIENTS[:3] + [CLIENTS[7]])
    assert "not on the mask roster" in unmask_roster_problem(outsider, submitted | {CLIENTS[7]}, groups, threshold=2)


def test_an_unmask_names_exactly_its_groups_dropped_clients():
    seed, keys = bytes([1]) * 32, [bytes([2]) * 32, bytes([3]) * 32]
    payload = encode_unmask(seed, keys)
    assert read_unmask(payload, CLIENTS[:2]) == (seed, {CLIENTS[0]: keys[0], CLIENTS[1]: keys[1]})
    for dropped in ([], CLIENTS[:1], CLIENTS[:3]):
        with pytest.raises(ValueError, match="bytes"):
            read_unmask(payload, dropped)
