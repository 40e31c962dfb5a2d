"""The organization's part in a secure-aggregation round (the stages are in infra.secure_round):
post the rosters while the round is open; once it is closed, check each masked update, post the
unmask roster, remove the self masks and the dropped clients' masks from each group's sum, and
merge the groups' means into the round's delta.

What it can no longer do per update: see one client's delta, its norm, or its direction, so the
per-update defences (norm bounds relative to the round, cosine screening) apply to groups, not to
clients. What it checks: every masked update's format, shape, round, base and sender (a bad one
counts as dropped, and its group is summed without it); the rosters' size against the threshold;
that every seed and secret it uses matches what its client committed to or signed; each group's
unmasked sum against the range its members' quantized values can reach, and its mean's norm
against what the mean of clipped updates can have (a group that fails is left out, not the
round); and the groups' means are merged by their coordinate median, so that one hostile member
moves only its own group's mean.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from eth_utils import to_checksum_address

from infra import chain
from infra.secure_round import (
    REVEAL_FORMAT,
    SecureRoundView,
    context,
    decode_shares_file,
    pack_roster,
    read_unmask,
    shares_at_once,
)
from processor import codec, secagg, secure_sum
from processor.aggregate import apply_delta, l2_norm
from processor.privacy import PrivacyPlan
from processor.secure_sum import quantization_bound
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
                 previously_keyed: set[str], threshold: int, stage_seconds: float, now: float,
                 barred: set[str] = frozenset()) -> StageWait:
    """Post the round's next roster once its stage is complete (every client expected has posted)
    or has lasted `stage_seconds`; what the round waits for then. The `barred` clients (they made
    an earlier round's group fail) are on no roster.

    When every invited client posted its (lasting) encryption key in the previous round
    (`previously_keyed`), the clients share their secrets at once and no key roster is needed:
    the one stage before masking waits for keys and shares together."""
    view = SecureRoundView.of(registry, info)
    at_once = shares_at_once(invited, previously_keyed, threshold)
    invited = [client for client in invited if client not in barred]
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


@dataclass
class SecureMerge:
    """The round's merge, or what it still waits for (`waiting`: in words, and how many client
    messages at least, and when its stage ends regardless); with the merge, the clients whose
    shares or vector made them fail (`culprits`: client -> why)."""
    merge: RoundMerge | None = None
    waiting: str | None = None
    messages: int | None = None
    ends_at: float = 0.0
    culprits: dict[str, str] = field(default_factory=dict)
    samples: int = 0  # the merged groups' total sample count, from their secure sums


def checked_vectors(task: Task, updates: list[Received], view: SecureRoundView, round_id: int,
                    base_cid: str) -> tuple[dict[str, Weights], dict[str, Verdict]]:
    """Every masked update decoded and checked on its own (format, shapes, field type, round, base,
    sender), by its client; the verdicts of those that fail, or are not on the mask roster."""
    roster = set(view.mask_roster or [])
    vectors: dict[str, Weights] = {}
    verdicts: dict[str, Verdict] = {}
    for update in updates:
        client = to_checksum_address(update.client)
        if client not in roster:
            verdicts[update.client] = Verdict(False, "not on the round's mask roster: its masks cannot cancel")
            continue
        try:
            if update.data is None:
                raise codec.CodecError(update.fetch_error or "the update could not be fetched")
            vectors[client] = codec.decode_masked_delta(task, update.data, round_id, base_cid, update.client)
        except codec.CodecError as exc:
            verdicts[update.client] = Verdict(False, f"its masked update is unusable ({exc}): it counts as dropped, "
                                                     "and its masks are removed from its group's sum")
    return vectors, verdicts


def survivors_of(groups: list[list[str]], valid: set[str], threshold: int) -> list[str]:
    """The clients whose vectors enter their group's sum: those with a valid vector, in the groups
    that hold at least `threshold` of them (a smaller sum could tell too much of one client)."""
    return sorted((c for group in groups if sum(c in valid for c in group) >= threshold for c in group if c in valid),
                  key=str.lower)


@dataclass
class Unmasking:
    """What the survivors' Unmask messages and the revealed shares give: each survivor's self-mask
    seed, and for each dropped client either its pairwise keys with every survivor of its group or
    its mask secret. `missing`: whose secret is still needed, and why."""
    seeds: dict[str, bytes] = field(default_factory=dict)
    pair_keys: dict[str, dict[str, bytes]] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, view: SecureRoundView, groups: list[list[str]], mask_context: bytes) -> "Unmasking":
        found = cls()
        survivors = set(view.unmask_roster or [])
        for group in groups:
            inside = [c for c in group if c in survivors]
            if not inside:
                continue
            dropped = view.excluded(group)
            for client in inside:
                try:
                    seed, keys = read_unmask(view.unmasks[client], dropped)
                    if secagg.seed_commitment(seed, mask_context) != view.keys[client].seed_commitment:
                        raise ValueError("its seed is not the one it committed to")
                except KeyError:
                    found.missing[client] = "it posted no unmask"
                    continue
                except ValueError as exc:
                    found.missing[client] = f"its unmask is unusable: {exc}"
                    continue
                found.seeds[client] = seed
                for other, key in keys.items():
                    found.pair_keys.setdefault(other, {})[client] = key
            for other in dropped:
                if len(found.pair_keys.get(other, {})) < len(inside):
                    found.missing[other] = "not every survivor of its group gave its pairwise key with it"
                    found.pair_keys.pop(other, None)
        return found

    def recover(self, view: SecureRoundView, reveals: dict[str, dict[str, bytes]], threshold: int,
                mask_context: bytes) -> dict[str, str]:
        """Rebuild the missing secrets from the revealed shares (each checked against its owner's
        signed key or seed commitment); the clients whose shares were revealed enough but rebuild
        nothing their owner signed for (their own shares were bad), with why."""
        survivors, bad = set(view.unmask_roster or []), {}
        for client in list(self.missing):
            shares = [revealed[client] for revealed in reveals.values() if client in revealed]
            posted = view.keys[client]
            if client in survivors:
                secret = secagg.recover(shares, threshold,
                                        lambda seed: secagg.seed_commitment(seed, mask_context) == posted.seed_commitment)
            else:
                secret = secagg.recover(shares, threshold, lambda key: secagg.public_key(key) == posted.mask)
            if secret is not None:
                (self.seeds if client in survivors else self.secrets)[client] = secret
                del self.missing[client]
            elif len(shares) > threshold:  # with one hostile revealer among them, some subset would have done
                bad[client] = (f"{len(shares)} of its shares were revealed, and none {threshold} of them rebuild the "
                               f"{'seed it committed to' if client in survivors else 'mask key it signed'}")
                self.missing[client] = bad[client]
            else:
                self.missing[client] += f"; {len(shares)} of the {threshold} shares needed are revealed"
        return bad


def read_reveals(view: SecureRoundView, holders: list[str], round_id: int, fetch) -> dict[str, dict[str, bytes]]:
    """The shares each of `holders` revealed, by the client they are of: only those made for it (a
    share's index is its holder's place among the holders, sorted, as processor.secagg.split_secret
    numbers them), so that a revealer corrupts no share but its own. A reveal that cannot be read
    is skipped (every secret rebuilt from them is checked anyway)."""
    reveals = {}
    ranks = {holder: rank for rank, holder in enumerate(sorted(holders, key=str.lower), 1)}
    for client in holders:
        if client in view.reveals:
            try:
                shares = decode_shares_file(fetch(view.reveals[client]), REVEAL_FORMAT, round_id, client)
                reveals[client] = {owner: share for owner, share in shares.items()
                                   if len(share) == secagg.SHARE_BYTES and secagg.share_index(share) == ranks[client]}
            except Exception as exc:  # whatever IPFS gave: this reveal does not count
                log.warning("round %d: the reveal of %s is not used: %s", round_id, client, exc)
    return reveals


def merge_secure_round(task: Task, base_weights: Weights, updates: list[Received], view: SecureRoundView,
                       registry: chain.Registry, key: str, info: chain.RoundInfo, plan: PrivacyPlan,
                       holders: list[str], stage_seconds: float, now: float, fetch) -> SecureMerge:
    """Take the closed secure round's unmasking as far as it goes now (posting the unmask roster,
    then the recovery roster when something is still missing after `stage_seconds`), and once
    every group's sum can be unmasked, or the stages are over, merge the groups' means. `holders`:
    whom the clients' shares went to (the key roster, or without one every invited client)."""
    round_id, threshold = info.round_id, plan.threshold
    mask_context = context(registry.address, round_id, "masks")
    groups = view.groups(plan.secure_groups, threshold, mask_context)
    vectors, verdicts = checked_vectors(task, updates, view, round_id, info.base_cid)
    culprits = {client: verdicts[u.client].reason for u in updates
                if (client := to_checksum_address(u.client)) in (view.mask_roster or []) and client not in vectors
                and u.data is not None}
    if view.unmask_roster is None:
        survivors = survivors_of(groups, set(vectors), threshold)
        if not survivors:
            return _refused(verdicts, updates, f"no group holds {threshold} valid masked updates (the threshold)",
                            round_id, culprits)
        registry.post_round_message(key, round_id, chain.MessageKind.UNMASK_ROSTER, pack_roster(survivors))
        log.info("round %d: unmask roster of %d survivors posted", round_id, len(survivors))
        return SecureMerge(waiting=f"the unmask messages of {len(survivors)} survivors", messages=len(survivors),
                           ends_at=now + stage_seconds)
    unmasking = Unmasking.of(view, groups, mask_context)
    if unmasking.missing:
        if view.recovery_roster is None:
            ends_at = block_time(registry, view.unmask_roster_block) + stage_seconds
            if now < ends_at:
                return SecureMerge(waiting=f"the unmask messages of {len(unmasking.missing)} clients",
                                   messages=sum(c in view.unmask_roster and c not in view.unmasks
                                                for c in unmasking.missing) or None, ends_at=ends_at)
            registry.post_round_message(key, round_id, chain.MessageKind.RECOVERY_ROSTER,
                                        pack_roster(list(unmasking.missing)))
            log.info("round %d: recovery roster posted: %s", round_id, unmasking.missing)
            return SecureMerge(waiting=f"the shares of {len(unmasking.missing)} clients' secrets",
                               messages=threshold, ends_at=now + stage_seconds)
        bad = unmasking.recover(view, read_reveals(view, holders, round_id, fetch), threshold, mask_context)
        ends_at = block_time(registry, view.recovery_roster_block) + stage_seconds
        if unmasking.missing and now < ends_at:
            return SecureMerge(waiting=f"the shares of {len(unmasking.missing)} clients' secrets", ends_at=ends_at)
        culprits.update(bad)
    return _merge_groups(task, base_weights, updates, view, groups, vectors, verdicts, unmasking, plan,
                         mask_context, round_id, culprits)


def _merge_groups(task: Task, base_weights: Weights, updates: list[Received], view: SecureRoundView,
                  groups: list[list[str]], vectors: dict[str, Weights], verdicts: dict[str, Verdict],
                  unmasking: Unmasking, plan: PrivacyPlan, mask_context: bytes, round_id: int,
                  culprits: dict[str, str]) -> SecureMerge:
    survivors = set(view.unmask_roster or [])
    quantizer = secagg.Quantizer(bound=quantization_bound(plan), max_clients=len(view.mask_roster))
    dimension = sum(int(np.prod(shape)) for shape in task.spec.values())
    by_address = {to_checksum_address(u.client): u.client for u in updates}
    means: list[tuple[Weights, int]] = []
    merged: list[tuple[int, list[str], int]] = []  # each mean's group number, survivors and sample count
    total_samples = 0  # of the merged groups: the only sample count of a secure round anyone reads
    for number, group in enumerate(groups, 1):
        inside = [c for c in group if c in survivors]
        if not inside:
            for client in group:
                if client in vectors:
                    verdicts[by_address[client]] = Verdict(False, f"its group {number} holds fewer than "
                                                                  f"{plan.threshold} valid masked updates")
            continue
        missing = {c: unmasking.missing[c] for c in group if c in unmasking.missing}
        missing.update({c: "its masked update could not be read again" for c in inside if c not in vectors})
        reason = None
        if missing:
            reason = "its masks cannot be removed: " + "; ".join(f"{c}: {why}" for c, why in missing.items())
        else:
            dropped = view.excluded(group)
            try:
                mean, samples = secure_sum.group_mean(
                    [vectors[c] for c in inside], quantizer, {c: view.keys[c].mask for c in inside}, mask_context,
                    {c: unmasking.seeds[c] for c in inside}, {d: unmasking.secrets[d] for d in dropped
                                                              if d in unmasking.secrets},
                    {d: unmasking.pair_keys[d] for d in dropped if d not in unmasking.secrets})
                norm = l2_norm(mean)
                bound = secure_sum.group_mean_bound(plan, dimension, len(inside), len(view.mask_roster))
                if not np.isfinite(norm) or norm > bound:
                    raise ValueError(f"its mean has L2 norm {norm:.4g}, beyond the {bound:.4g} that the mean of "
                                     f"{len(inside)} clipped updates can have: a member did not clip")
                means.append((mean, len(inside)))
                merged.append((number, inside, samples))
            except ValueError as exc:
                reason = str(exc)
        for client in inside:
            verdicts[by_address[client]] = (Verdict(False, f"refused with its group {number} of {len(inside)}: {reason}")
                                            if reason else Verdict(True, None, weight=1))
        if reason:
            log.warning("round %d: group %d refused: %s", round_id, number, reason)
    if not means:
        return SecureMerge(RoundMerge(None, verdicts), culprits=culprits)
    delta, left_out = secure_sum.merge_groups(means)
    for index, (number, inside, samples) in enumerate(merged):
        if index in left_out:
            log.warning("round %d: group %d left out of the merge: %s", round_id, number, left_out[index])
            for client in inside:
                verdicts[by_address[client]] = Verdict(False, f"refused with its group {number} of {len(inside)}: "
                                                              f"{left_out[index]}")
        else:
            total_samples += samples
    return SecureMerge(RoundMerge(apply_delta(base_weights, delta), verdicts), culprits=culprits,
                       samples=total_samples)


def _refused(verdicts: dict[str, Verdict], updates: list[Received], reason: str, round_id: int,
             culprits: dict[str, str]) -> SecureMerge:
    for update in updates:
        verdicts.setdefault(update.client, Verdict(False, reason))
    log.warning("round %d: secure merge refused: %s", round_id, reason)
    return SecureMerge(RoundMerge(None, verdicts), culprits=culprits)
