"""Attacks on secure rounds, made of the product's own client code: a hostile client (one kind of
misbehaviour a round) and an outside reader of the public record.

The hostile client is a real client agent whose process swaps some of client.secure_round's
functions for its own while it runs (`HostileClient.installed`): what a user who edits the
client's code could do. Its kinds, one a round:
- `wrong_length`: a masked update whose tensors have the wrong shapes;
- `out_of_range`: a masked update of uniform field elements (values outside the quantization range);
- `other_secret`: valid signed keys, then shares of another mask secret and seed, then silence;
- `bad_key`: a mask key that agrees the all-zero secret with anyone (a small-order point);
- `silent`: keys and shares, then silence;
- `steer`: a masked update chosen to set its group's mean: it computes its real masks and adds the
  field element that lands the group's sum on a target of its own (against its own delta, with
  the largest norm a group's mean may have), assuming the others' values are the mid-point.

The outside reader (`unmask_attempts`) takes every masked update it can find (the chain's
submissions, and CIDs found on IPFS, such as a late client's) and removes every mask the public
record lets it compute: pairwise masks from mask secrets rebuilt from revealed shares or from the
survivors' revealed pairwise keys, self masks from revealed seeds or from revealed seed shares.
What is left is correlated with the client's true delta.
"""
from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time

import numpy as np
from eth_account import Account
from eth_utils import to_checksum_address

from client import secure_round as client_round
from infra import chain
from infra.secure_round import REVEAL_FORMAT, SecureRoundView, context, decode_shares_file, group_of, read_unmask
from processor import codec, secagg
from processor.privacy import PrivacyPlan
from processor.secure_sum import group_mean_bound, quantization_bound
from processor.weights import flatten, unflatten

KINDS = ("wrong_length", "out_of_range", "other_secret", "bad_key", "silent", "steer")
SILENT_KINDS = ("other_secret", "silent")  # post keys and shares, then nothing
SMALL_ORDER_POINT = (1).to_bytes(32, "little")  # RFC 7748's point of order 4: every agreement gives zero


class HostileClient:
    """The client at `address`, misbehaving by `kind` (None: honest) in the rounds it takes part in."""

    def __init__(self, address: str, plan: PrivacyPlan) -> None:
        self.address = to_checksum_address(address)
        self.plan = plan
        self.kind: str | None = None

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(client_round, name) for name in ("post_keys", "add_shares", "masked_update")}
        client_round.post_keys = self._post_keys(originals["post_keys"])
        client_round.add_shares = self._add_shares(originals["add_shares"])
        client_round.masked_update = self._masked_update(originals["masked_update"])
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(client_round, name, function)

    def _mine(self, party_or_me) -> bool:
        return self.kind is not None and to_checksum_address(party_or_me) == self.address

    def _post_keys(self, original):
        def post_keys(registry, key, party, shares_cid=None):
            if self.kind == "bad_key" and Account.from_key(key).address == self.address:
                party = dataclasses.replace(party, mask=secagg.KeyPair(secret=bytes(32), public=SMALL_ORDER_POINT))
            return original(registry, key, party, shares_cid)
        return post_keys

    def _add_shares(self, original):
        def add_shares(registry, store, me, party, holders, threshold):
            if self._mine(me) and self.kind == "other_secret":  # shares of secrets that are not its own
                party = dataclasses.replace(party, mask=secagg.new_key_pair(), seed=secrets.token_bytes(32))
            return original(registry, store, me, party, holders, threshold)
        return add_shares

    def _masked_update(self, original):
        def masked_update(registry, task, party, me, view, delta, bound, num_samples, groups, threshold):
            if not self._mine(me) or self.kind not in ("wrong_length", "out_of_range", "steer"):
                return original(registry, task, party, me, view, delta, bound, num_samples, groups, threshold)
            if self.kind == "wrong_length":
                tensors = {n: np.zeros(t.size + 1, np.uint32) for n, t in delta.items()}
            elif self.kind == "out_of_range":
                tensors = {n: np.frombuffer(secrets.token_bytes(4 * t.size), np.uint32).reshape(t.shape)
                           for n, t in delta.items()}
            else:
                tensors = self._steering(registry, task, party, me, view, delta, groups, threshold, num_samples)
            tensors.setdefault(codec.SAMPLES_TENSOR, np.ones(1, np.uint32))
            return codec.encode_masked_delta(task, tensors, party.round_id, party.base_cid, me)
        return masked_update

    def _steering(self, registry, task, party, me, view, delta, groups, threshold, num_samples):
        quantizer = secagg.Quantizer(bound=quantization_bound(self.plan), max_clients=len(view.mask_roster))
        mask_context = context(registry.address, party.round_id, "masks")
        group = group_of(view.groups(groups, threshold, mask_context), me)
        own = flatten(delta).astype(np.float64)
        target = -own / max(np.linalg.norm(own), 1e-12) * 0.99 * group_mean_bound(self.plan, own.size, len(group),
                                                                                   len(view.mask_roster))
        middle = quantizer.quantize(np.zeros(own.size))
        value = (np.uint32(len(group)) * quantizer.quantize(target) - np.uint32(len(group) - 1) * middle).astype(np.uint32)
        peers = {client: view.keys[client].mask for client in group if client != me}
        masked = secagg.mask(np.append(value, np.uint32(num_samples)), me, party.mask.secret, peers, mask_context,
                             party.seed)
        return {**unflatten(masked[:-1], delta), codec.SAMPLES_TENSOR: masked[-1:]}


def unmask_attempts(registry: chain.Registry, store, task, round_id: int, plan: PrivacyPlan,
                    found_cids: dict[str, str], truths: dict[str, dict]) -> dict[str, float]:
    """For every masked update an outside reader can find of round `round_id` (its submissions on
    chain, and `found_cids`: client -> CID found on IPFS), the correlation between what is left once
    every mask the public record gives is removed, dequantized, and that client's true delta
    (`truths`): 1 for an update exposed, near 0 for one still masked."""
    info = registry.round(round_id)
    view = SecureRoundView.of(registry, info)
    mask_context = context(registry.address, round_id, "masks")
    groups = view.groups(plan.secure_groups, plan.threshold, mask_context)
    cids = {to_checksum_address(s.client): s.cid for s in registry.logged_submissions(info)}
    cids.update({to_checksum_address(c): cid for c, cid in found_cids.items()})
    unmasks = {}
    for group in groups:
        dropped = view.excluded(group)
        for client in group:
            if client in view.unmasks:
                with contextlib.suppress(ValueError):
                    unmasks[client] = read_unmask(view.unmasks[client], dropped)
    revealed: dict[str, list[bytes]] = {}
    for client, cid in view.reveals.items():
        with contextlib.suppress(Exception):
            for owner, share in decode_shares_file(store.get(cid), REVEAL_FORMAT, round_id, client).items():
                revealed.setdefault(owner, []).append(share)
    quantizer = secagg.Quantizer(bound=quantization_bound(plan), max_clients=len(view.mask_roster or [1]))
    correlations = {}
    for client, cid in cids.items():
        if client not in truths or client not in view.keys or client not in (view.mask_roster or []):
            continue
        with contextlib.suppress(codec.CodecError):
            masked = codec.decode_masked_delta(task, store.get(cid), round_id, info.base_cid, client)
            values = np.append(flatten({n: masked[n] for n in task.spec}), masked[codec.SAMPLES_TENSOR])
            group = group_of(groups, client)
            # its self mask: its own revealed seed, or one rebuilt from revealed seed shares
            seed = unmasks[client][0] if client in unmasks else secagg.recover(
                revealed.get(client, []), plan.threshold,
                lambda s: secagg.seed_commitment(s, mask_context) == view.keys[client].seed_commitment)
            if seed is not None:
                values = values - secagg.self_mask(seed, values.size, mask_context)
            # its pairwise masks: with its secret rebuilt from shares, or each peer's revealed key with it
            secret = secagg.recover(revealed.get(client, []), plan.threshold,
                                    lambda s: secagg.public_key(s) == view.keys[client].mask)
            for peer in group:
                if peer == client:
                    continue
                key = (secagg.pair_key(secret, client, peer, view.keys[peer].mask, mask_context) if secret is not None
                       else unmasks.get(peer, (None, {}))[1].get(client))
                if key is not None:
                    stream = secagg.mask_stream(key, values.size)
                    values = values - stream if client.lower() < peer.lower() else values + stream
            guess = quantizer.dequantize_sum(values[:-1].astype(np.uint32), 1)  # its sample count last
            truth = np.clip(flatten(truths[client]), -quantizer.bound, quantizer.bound)
            correlations[client] = float(np.corrcoef(guess, truth)[0, 1])
    return correlations


@dataclasses.dataclass
class Cast:
    """Who does what in a hostile run: the hostile client (None: absent), one that is always late
    (it masks and adds its update to IPFS as the round closes without it), one that drops out after
    posting its keys and shares, and the honest rest."""
    hostile: object | None
    late: object
    dropout: object


def pump_round(runner, agents: list, cast: Cast, hostile: HostileClient | None, plan: PrivacyPlan,
               duration: float) -> tuple[int, str | None]:
    """One secure round through its stages, the agents stepped by hand as their watchers would; the
    round's number and the CID the late client added to IPFS (None if it could not)."""
    org = runner.service
    registry = org.registry
    round_id = registry.current_round()

    def stays_after_masking(agent) -> bool:
        if agent is cast.late or agent is cast.dropout:
            return False
        return not (agent is cast.hostile and hostile.kind in SILENT_KINDS)

    for _ in range(20):
        view = SecureRoundView.of(registry, registry.round(round_id))
        masking = view.mask_roster is not None
        for agent in agents:
            if not masking or stays_after_masking(agent):
                agent.check_round()
        if masking:
            expected = [a for a in agents if a.service.address in view.mask_roster and stays_after_masking(a)]
            if all(a.done_with(round_id) for a in expected):
                break
        runner.step()
    org.clock = lambda: time.time() + duration + 3  # past the deadline: closed without the late and the dropout
    runner.step()
    late_cid = None
    view = SecureRoundView.of(registry, registry.round(round_id))
    service = cast.late.service
    if view.mask_roster and service.address in view.mask_roster and service.trained is not None:
        late_cid = service.store.add(client_round.masked_update(
            registry, service.task, service.secure_party, service.address, view, service.trained.result.delta,
            quantization_bound(plan), service.trained.result.num_samples, plan.secure_groups, plan.threshold))
    for step in range(6):  # unmasks, then (when asked) the revealed shares
        if registry.round(round_id).finalized:
            break
        for agent in agents:
            if stays_after_masking(agent):
                agent.check_round()
        org.clock = lambda: time.time() + duration + 3 + 20 * step  # each stage's wait over in turn
        runner.step()
    org.clock = time.time
    return round_id, late_cid
