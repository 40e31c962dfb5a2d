"""A device's part in a secure-aggregation round (the stages are in infra.secure_round).

Its mask secret and its self-mask seed are ephemeral: made for the one round, in this process's
memory only, never on disk and never derived from the account's key (revealing a dropped client's
mask secret must reveal nothing else). Of each peer it reveals at most one kind: the share of its
seed when the unmask roster counts it a survivor, the share of its mask secret (or, as a survivor
itself, its pairwise key with it) when it counts it dropped. The key its secret shares are
encrypted to is its own for good, derived from the account's key (never revealed, and the same
after a restart): once a round has published every client's, the next round's clients post their
keys and their shares at once, without waiting for a key roster.
"""
from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np
from eth_utils import to_checksum_address

from eth_account import Account

from infra import chain
from infra.ipfs import StorageError, StorageUnavailable
from infra.secure_round import (
    MAX_FILE_BYTES,
    REVEAL_FORMAT,
    SHARES_FORMAT,
    SecureRoundView,
    context,
    decode_shares_file,
    encode_shares_file,
    encode_unmask,
    group_of,
    keys_before,
    shares_at_once,
    signed_keys,
    unmask_roster_problem,
)
from processor import codec, secagg, secure_sum

log = logging.getLogger("client.secure")


def encryption_key_pair(account_key: str) -> secagg.KeyPair:
    """The X25519 key pair a client's secret shares are encrypted to, derived from its account's key."""
    secret = secagg.derive_key(Account.from_key(account_key).key, b"fl-secagg|share encryption key")
    return secagg.KeyPair(secret, secagg.public_key(secret))


@dataclass
class SecureParty:
    """This device in one secure round."""
    round_id: int
    base_cid: str
    encryption: secagg.KeyPair
    mask: secagg.KeyPair = field(default_factory=secagg.new_key_pair)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(secagg.KEY_BYTES), repr=False)  # self mask
    info: chain.RoundInfo | None = None  # the round as read once: its start block bounds its messages
    # who its shares go to without a key roster, with their encryption keys (None: the roster decides)
    holders: dict[str, bytes] | None = None
    submitted: bool = False
    unmasked: bool = False  # its Unmask is posted (or the unmask roster needs none of it)
    revealed: bool = False  # its shares for the recovery roster are posted


def share_associated(sender: str, holder: str) -> bytes:
    """Binds an encrypted share to who made it and who holds it (a share moved to another holder fails)."""
    return f"{sender.lower()}->{holder.lower()}".encode()


def post_keys(registry: chain.Registry, key: str, party: SecureParty, shares_cid: str | None = None) -> None:
    """The round's signed keys; with `shares_cid`, the client's shares too, in the same message."""
    commitment = secagg.seed_commitment(party.seed, context(registry.address, party.round_id, "masks"))
    payload = signed_keys(key, registry.address, party.round_id, party.encryption.public, party.mask.public,
                          commitment)
    registry.post_round_message(key, party.round_id, chain.MessageKind.KEYS,
                                payload + (shares_cid.encode() if shares_cid else b""))


class RoundFacts:
    """What every device of a process reads alike of a secure round, read once for them all: where
    its messages start (its start block and draw), and whom each client's shares go to when it
    needs no key roster (every client it invites, from the enrolment events and the draw, with the
    encryption key it posted in the round before), or None when it needs one
    (infra.secure_round.shares_at_once)."""

    def __init__(self) -> None:
        self._enrolment = chain.EnrolmentLog()
        self._round: tuple[tuple[str, int], chain.RoundInfo, dict[str, bytes] | None] | None = None
        self._closed: tuple[tuple[str, int], SecureRoundView, set[str]] | None = None
        # what the current round's messages read so far say, and the last block they were read to:
        # each message is parsed and checked once for the process (a keys message's checks cost 0.4 ms)
        self._messages: tuple[tuple[str, int], int, SecureRoundView] | None = None
        self._lock = threading.Lock()
        self._messages_lock = threading.Lock()  # one device reads the new blocks, the others wait for it
        self._closing_lock = threading.Lock()

    def view(self, registry: chain.Registry, info: chain.RoundInfo) -> SecureRoundView:
        """Round `info`'s messages as they stand on chain: only the blocks mined since the last
        read of any device of the process are read."""
        key = (registry.address, info.round_id)
        with self._messages_lock:
            if self._messages is None or self._messages[0] != key:
                self._messages = (key, 0, SecureRoundView())
            _, read_to, view = self._messages
            latest = registry.w3.eth.block_number
            if latest > read_to:
                view.taking(registry.round_messages(info, read_to + 1, latest), registry.owner, registry.address,
                            info.round_id)
                self._messages = (key, latest, view)
            return view.copy()

    def after_closing(self, registry: chain.Registry, info: chain.RoundInfo,
                      need_recovery: bool = False) -> tuple[SecureRoundView, set[str]]:
        """Closed round `info`'s messages and who submitted to it, for unmasking: read once for every
        device of the process once the unmask roster is out (what unmasking reads of them is fixed
        from then on), and again while `need_recovery` and no recovery roster is in what was read."""
        key = (registry.address, info.round_id)
        with self._closing_lock:  # the process's devices ask at once: the first one reads, the others wait
            cached = self._closed if self._closed is not None and self._closed[0] == key else None
            if cached is not None and not (need_recovery and cached[1].recovery_roster is None):
                return cached[1], cached[2]
            view = self.view(registry, info)
            submitted = cached[2] if cached is not None else {
                to_checksum_address(s.client) for s in registry.logged_submissions(info)}
            if view.unmask_roster is not None:
                self._closed = (key, view, submitted)
            return view, submitted

    def of(self, registry: chain.Registry, round_id: int, threshold: int) -> tuple[chain.RoundInfo,
                                                                                   dict[str, bytes] | None]:
        """Round `round_id`'s record (the parts that never change) and its holders at once."""
        with self._lock:
            key = (registry.address, round_id)
            if self._round is None or self._round[0] != key:  # only the current round's are kept
                info = registry.round(round_id)
                self._round = (key, info, self._holders_at_once(registry, info, threshold))
            return self._round[1], self._round[2]

    def _holders_at_once(self, registry: chain.Registry, info: chain.RoundInfo,
                         threshold: int) -> dict[str, bytes] | None:
        if info.round_id < 2:
            return None
        self._enrolment.update(registry)
        invited = [client for client in self._enrolment.clients_for(info.round_id) if info.invites(client)]
        previous = keys_before(registry, info.round_id)
        if not shares_at_once(invited, previous, threshold):
            return None
        return {client: previous[client].encryption for client in invited}


def share_holders(party: SecureParty, view: SecureRoundView) -> dict[str, bytes]:
    """Who this client's shares go to, with their encryption keys: the key roster once posted, or
    every invited client when the round needs none; else none yet (the key roster is awaited)."""
    if view.key_roster is not None:
        return {client: view.keys[client].encryption for client in view.key_roster}
    return party.holders or {}


def add_shares(registry: chain.Registry, store, me: str, party: SecureParty, holders: dict[str, bytes],
               threshold: int) -> str:
    """Split the mask secret and the self-mask seed among `holders` (t of them recover either),
    each holder's pair of shares sealed to its key, into a file added to IPFS; its CID."""
    secret_shares = secagg.split_secret(party.mask.secret, list(holders), threshold)
    seed_shares = secagg.split_secret(party.seed, list(holders), threshold)
    share_context = context(registry.address, party.round_id, "shares")
    sealed = {holder: secagg.seal(key, secret_shares[holder] + seed_shares[holder], share_associated(me, holder))
              for holder, key in secagg.shared_keys(party.encryption.secret, holders, share_context).items()}
    return store.add(encode_shares_file(SHARES_FORMAT, party.round_id, me, sealed))


def masked_update(registry: chain.Registry, task, party: SecureParty, me: str, view: SecureRoundView, delta,
                  bound: float, num_samples: int, groups: int, threshold: int) -> bytes:
    """The trained (and privatized) delta, quantized and masked against the other members of its
    group of the mask roster and by its self mask, encoded."""
    roster = view.mask_roster
    quantizer = secagg.Quantizer(bound=bound, max_clients=len(roster))
    mask_context = context(registry.address, party.round_id, "masks")
    group = group_of(view.groups(groups, threshold, mask_context), me)
    peers = {client: view.keys[client].mask for client in group if client != me}
    # stochastic rounding keeps the mean unbiased; its randomness need not be secret (the masks hide it)
    rng = np.random.default_rng(secrets.randbits(128))
    masked = secure_sum.masked_delta(delta, quantizer, me, party.mask.secret, party.seed, peers, mask_context, rng,
                                     num_samples)
    return codec.encode_masked_delta(task, masked, party.round_id, party.base_cid, me)


def roster_problem(view: SecureRoundView, me: str, threshold: int) -> str | None:
    """Why this client must not go on with the rosters as they stand (None when it may): a roster
    that leaves it out, names clients without keys, or is smaller than the threshold (then the
    organization could learn a single client's update from the sum)."""
    for name, roster in (("key", view.key_roster), ("mask", view.mask_roster)):
        if roster is None:
            continue
        if me not in roster:
            return f"the {name} roster leaves this client out"
        if len(roster) < threshold:
            return f"the {name} roster names {len(roster)} clients, fewer than the threshold {threshold}"
        if any(client not in view.keys for client in roster):
            return f"the {name} roster names clients that posted no valid keys"
    if view.mask_roster is not None and any(client not in view.shares for client in view.mask_roster):
        return "the mask roster names clients that posted no shares"
    return None


def unmask(registry: chain.Registry, key: str, me: str, party: SecureParty, view: SecureRoundView,
           submitted: set[str], groups: int, threshold: int) -> list[str]:
    """Once the unmask roster is out: as a survivor, post this client's self-mask seed and its
    pairwise key with each dropped member of its group (the dropped clients it names). A roster
    that does not hold against the chain's `submitted` (infra.secure_round.unmask_roster_problem)
    gets nothing."""
    mask_context = context(registry.address, party.round_id, "masks")
    round_groups = view.groups(groups, threshold, mask_context)
    problem = unmask_roster_problem(view, submitted, round_groups, threshold)
    if problem:  # nothing of this round is revealed then, no share either
        party.unmasked = party.revealed = True
        log.warning("round %d: nothing unmasked: %s", party.round_id, problem)
        raise ValueError(problem)
    if me not in view.unmask_roster:
        party.unmasked = True
        return []
    dropped = view.excluded(group_of(round_groups, me))
    pair_keys = [secagg.pair_key(party.mask.secret, me, c, view.keys[c].mask, mask_context) for c in dropped]
    registry.post_round_message(key, party.round_id, chain.MessageKind.UNMASK, encode_unmask(party.seed, pair_keys))
    party.unmasked = True  # once on chain: a failed transaction is tried again at the next look
    return dropped


def reveal(registry: chain.Registry, store, key: str, me: str, party: SecureParty, view: SecureRoundView,
           timeout: float) -> list[str]:
    """Once the recovery roster is out: decrypt and post this client's shares of the secrets it
    names, one kind per client as the unmask roster decides: of a survivor its self-mask seed's
    share, of a dropped client its mask secret's. Never both: with both, the organization could
    unmask that client's update."""
    survivors, on_roster = set(view.unmask_roster or []), set(view.mask_roster or [])
    if (view.unmask_roster is None or not set(view.recovery_roster or []) <= on_roster
            or view.recovery_roster_block < view.unmask_roster_block):
        party.revealed = True
        raise ValueError("the recovery roster names clients that are not on the mask roster, or came before "
                         "the unmask roster")
    revealed: dict[str, bytes] = {}
    share_context = context(registry.address, party.round_id, "shares")
    for client in view.recovery_roster:
        if client not in view.shares or client not in view.keys:
            continue
        try:
            sealed = decode_shares_file(store.get(view.shares[client], timeout=timeout, max_bytes=MAX_FILE_BYTES),
                                        SHARES_FORMAT, party.round_id, client)[me]
            pair = secagg.open_sealed(
                secagg.shared_key(party.encryption.secret, view.keys[client].encryption, share_context),
                sealed, share_associated(client, me))
            if len(pair) != 2 * secagg.SHARE_BYTES:
                raise ValueError(f"a pair of shares is {2 * secagg.SHARE_BYTES} bytes, this one {len(pair)}")
            revealed[client] = pair[secagg.SHARE_BYTES:] if client in survivors else pair[:secagg.SHARE_BYTES]
        except StorageUnavailable:  # the node is down: the whole reveal is tried again
            raise
        except (KeyError, ValueError, StorageError) as exc:  # that client's file: the others' shares still go
            log.warning("round %d: no share of %s's secret to reveal: %s", party.round_id, client, exc)
    if revealed:
        cid = store.add(encode_shares_file(REVEAL_FORMAT, party.round_id, me, revealed))
        registry.post_round_message(key, party.round_id, chain.MessageKind.REVEAL, cid.encode())
    party.revealed = True  # once on chain: a failed add or transaction is tried again at the next look
    return sorted(revealed)
