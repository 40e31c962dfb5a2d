"""The organization's part in a secure-aggregation round (the stages are in infra.secure_round):
post the rosters while the round is open, and once it is closed, recover the mask secrets of the
clients that dropped out and turn the masked updates' sum into the round's mean delta.

What it can no longer do per update: see one client's delta, its norm, or its direction, so none
of the per-update defences (norm bounds relative to the round, robust aggregation, cosine
screening) applies; the mean is the only aggregation. What it still checks: every masked update's
format, shape, round, base and sender; the rosters' size against the threshold; that every
recovered secret matches the public key its client signed; and the unmasked mean's finiteness and
range (each coordinate within the quantization bound).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from eth_utils import to_checksum_address

from infra import chain
from infra.secure_round import (
    REVEAL_FORMAT,
    SecureRoundView,
    context,
    decode_shares_file,
    pack_roster,
    shares_at_once,
)
from processor import codec, secagg, secure_sum
from processor.aggregate import apply_delta
from processor.screen import Received, RoundMerge, Verdict
from processor.tasks import Task
from processor.weights import Weights

log = logging.getLogger("organization.secure")


def block_time(registry: chain.Registry, block_number: int) -> float:
    return float(registry.w3.eth.get_block(block_number)["timestamp"])


@dataclass(frozen=True)
class StageWait:
    """What an open secure round waits for: in words, how many client messages (None: none, it
    waits for updates), when its stage ends regardless (unix seconds; 0: no such end), and the
    updates it expects once its mask roster is posted (None before)."""
    text: str
    messages: int | None = None
    ends_at: float = 0.0
    expected: int | None = None


def post_rosters(registry: chain.Registry, key: str, info: chain.RoundInfo, invited: list[str],
                 previously_keyed: set[str], threshold: int, stage_seconds: float, now: float) -> StageWait:
    """Post the round's next roster once its stage is complete (every client expected has posted)
    or has lasted `stage_seconds`; what the round waits for then.

    When every invited client posted its (lasting) encryption key in the previous round
    (`previously_keyed`), the clients share their secrets at once and no key roster is needed:
    the one stage before masking waits for keys and shares together."""
    view = SecureRoundView.of(registry, info)
    at_once = shares_at_once(invited, previously_keyed, threshold)
    if view.key_roster is None and not at_once:
        expected, posted, since = invited, [c for c in invited if c in view.keys], info.start_block
        kind, what, roster, missing = chain.MessageKind.KEY_ROSTER, "keys", "key roster", None
    elif view.mask_roster is None:
        expected = view.key_roster if view.key_roster is not None else invited
        posted = [c for c in expected if c in view.shares and c in view.keys]
        since = view.key_roster_block or info.start_block
        kind, what, roster = chain.MessageKind.MASK_ROSTER, "keys and secret shares", "mask roster"
        # messages still to come, at least: one from each expected client without shares (keys and
        # shares come in one message when there is no key roster); too few costs a look, too many a stall
        missing = sum(c not in view.shares for c in expected)
    else:
        return StageWait("the masked updates", expected=len(view.mask_roster))
    ends_at = block_time(registry, since) + stage_seconds
    if len(posted) < len(expected) and now < ends_at:
        return StageWait(f"{what} from {len(expected) - len(posted)} of {len(expected)} clients",
                         missing if missing is not None else len(expected) - len(posted), ends_at)
    if len(posted) < threshold:
        return StageWait(f"{what} from at least {threshold} clients (the threshold); {len(posted)} came by the "
                         "stage's end: the round cannot be secure and will miss its quorum")
    registry.post_round_message(key, info.round_id, kind, pack_roster(posted))
    log.info("round %d: %s of %d clients posted (their %s came)", info.round_id, roster, len(posted), what)
    if kind == chain.MessageKind.KEY_ROSTER:
        return StageWait("the clients' secret shares", len(posted), now + stage_seconds)
    return StageWait("the masked updates", expected=len(posted))


def recovered_secrets(view: SecureRoundView, dropped: list[str], reveals: dict[str, dict[str, bytes]],
                      threshold: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """The mask secrets of the `dropped` clients from the survivors' revealed shares, and for each
    that cannot be recovered (yet), why. A secret counts only if it gives the public key its client
    signed: a wrong share cannot slip a wrong secret in."""
    found, missing = {}, {}
    for client in dropped:
        shares = [revealed[client] for revealed in reveals.values() if client in revealed]
        if len(shares) < threshold:
            missing[client] = f"{len(shares)} of the {threshold} shares needed are revealed"
            continue
        try:
            secret = secagg.combine_shares(shares[:threshold], threshold)
        except ValueError as exc:
            missing[client] = f"its shares do not combine: {exc}"
            continue
        if secagg.public_key(secret) != view.keys[client].mask:
            missing[client] = "the revealed shares give a secret that is not its signed mask key's"
            continue
        found[client] = secret
    return found, missing


def read_reveals(view: SecureRoundView, survivors: list[str], round_id: int, fetch) -> dict[str, dict[str, bytes]]:
    """The shares each survivor revealed, by dropped client; a reveal that cannot be read is skipped."""
    reveals = {}
    for client in survivors:
        if client in view.reveals:
            try:
                reveals[client] = decode_shares_file(fetch(view.reveals[client]), REVEAL_FORMAT, round_id, client)
            except Exception as exc:  # whatever IPFS gave: this reveal does not count
                log.warning("round %d: the reveal of %s is not used: %s", round_id, client, exc)
    return reveals


@dataclass
class SecureMerge:
    """The round's merge, or what it still waits for (`waiting`), or why it is refused (merge.weights None)."""
    merge: RoundMerge | None = None
    waiting: str | None = None


def merge_secure_round(task: Task, base_weights: Weights, updates: list[Received], view: SecureRoundView,
                       round_id: int, base_cid: str, registry_address: str, threshold: int, bound: float,
                       reveals: dict[str, dict[str, bytes]], reveal_window_over: bool) -> SecureMerge:
    """Unmask the sum of the survivors' masked updates and add its mean to the base."""
    roster = view.mask_roster or []
    verdicts: dict[str, Verdict] = {}
    survivors = []
    for update in updates:
        if to_checksum_address(update.client) in roster:
            survivors.append(update)
        else:
            verdicts[update.client] = Verdict(False, "not on the round's mask roster: its masks cannot cancel")
    dropped = view.dropped({to_checksum_address(u.client) for u in survivors})

    def refused(reason: str) -> SecureMerge:
        for update in survivors:
            verdicts[update.client] = Verdict(False, reason)
        log.warning("round %d: secure merge refused: %s", round_id, reason)
        return SecureMerge(RoundMerge(None, verdicts))

    if len(survivors) < threshold:
        return refused(f"{len(survivors)} masked updates, fewer than the threshold {threshold}")
    secrets, missing = recovered_secrets(view, dropped, reveals, threshold)
    if missing:
        reason = "; ".join(f"{client}: {why}" for client, why in missing.items())
        if not reveal_window_over:
            return SecureMerge(waiting=f"the secrets of {len(missing)} dropped clients ({reason})")
        return refused(f"the masks of dropped clients cannot be removed ({reason})")
    masked = []
    for update in survivors:
        try:
            if update.data is None:
                raise codec.CodecError(update.fetch_error or "the update could not be fetched")
            masked.append(codec.decode_masked_delta(task, update.data, round_id, base_cid, update.client))
        except codec.CodecError as exc:
            # its masks are in no sum without it: the round's sum cannot be unmasked
            return refused(f"the masked update of {update.client} is unusable ({exc}), and without it the "
                           "others' masks do not cancel")
    quantizer = secagg.Quantizer(bound=bound, max_clients=len(roster))
    mask_context = context(registry_address, round_id, "masks")
    survivor_keys = {client: view.keys[client].mask for client in map(to_checksum_address, (u.client for u in survivors))}
    mean = secure_sum.unmasked_mean(masked, quantizer, survivor_keys, secrets, mask_context)
    out_of_range = max(float(np.max(np.abs(t), initial=0.0)) for t in mean.values())
    if not np.isfinite(out_of_range) or out_of_range > bound:
        return refused(f"the unmasked mean holds a value of size {out_of_range:.4g}, beyond the bound {bound:g}")
    for update in survivors:
        verdicts[update.client] = Verdict(True, None, weight=1)
    return SecureMerge(RoundMerge(apply_delta(base_weights, mean), verdicts))
