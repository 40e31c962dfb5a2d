"""The messages of a secure-aggregation round, as the chain and IPFS carry them, read and checked.

A secure round's stages (Bonawitz et al. 2017, with double masking; which clients dropped out is
decided by the chain, where an update either was submitted before the round closed or was not,
and by the organization's checks of each masked vector, posted before anything is revealed):

1. every invited client posts two ephemeral X25519 public keys, one to encrypt secret shares and
   one to agree pairwise masks, and a commitment to its self-mask seed, signed with its
   account's key (RoundMessage Keys);
2. the organization posts the key roster: the clients whose keys the round uses;
3. each client on it splits its mask secret and its self-mask seed into Shamir shares, one pair
   per client on the roster, encrypts each pair to its holder, adds the file to IPFS and posts
   its CID (Shares);
4. the organization posts the mask roster: the clients whose shares arrived. It is split into
   groups (processor.secagg.groups_of), each summed on its own;
5. each client on it trains, quantizes its delta, adds the pairwise masks agreed with every other
   member of its group and its self mask, and submits it as its update, unless the round has
   closed meanwhile: then it publishes nothing;
6. once the round is closed, the organization checks every masked update it got and posts the
   unmask roster: the survivors, whose vectors enter their group's sum (a group left with fewer
   than the threshold enters none); everyone else on the mask roster counts as dropped;
7. each survivor posts its self-mask seed and, for each dropped member of its group, the pairwise
   key it agreed with it (Unmask): then no share is needed;
8. only when something is still missing, the organization posts the recovery roster (whose
   secrets it needs), and the clients reveal their shares of them (Reveal): of a survivor, the
   share of its self-mask seed; of a dropped client, the share of its mask secret. Never both
   kinds for one client, so a dropped client's update stays behind its self mask for good, and a
   survivor's behind its pairwise masks.

Every byte read here may come from an attacker: a message that does not parse is ignored, and
the reason is kept; a sender's first message of each kind is the one that counts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import orjson
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from typing import Annotated

from infra.chain import MessageKind, Registry, RoundInfo, RoundMessage
from processor import secagg

KEY_BYTES = 32  # an X25519 public key
SIGNATURE_BYTES = 65  # r, s, v of an account's signature
ADDRESS_BYTES = 20
SHARES_FORMAT = "fl-secagg-shares/1"
REVEAL_FORMAT = "fl-secagg-reveal/1"
MAX_FILE_BYTES = 512 * 1024  # a shares or reveal file: about 380 bytes per holder (a sealed pair of shares)
MAX_ROSTER = 1000
ROSTERS = {MessageKind.KEY_ROSTER: "key_roster", MessageKind.MASK_ROSTER: "mask_roster",
           MessageKind.UNMASK_ROSTER: "unmask_roster", MessageKind.RECOVERY_ROSTER: "recovery_roster"}


def context(registry_address: str, round_id: int, purpose: str) -> bytes:
    """What binds a derived key to one registry, one round and one use (masks or share encryption)."""
    return f"fl-secagg|{purpose}|{to_checksum_address(registry_address)}|{round_id}".encode()


KEYS_BYTES = 3 * KEY_BYTES + SIGNATURE_BYTES  # a Keys message before its shares' CID


def keys_statement(registry_address: str, round_id: int, encryption_key: bytes, mask_key: bytes,
                   seed_commitment: bytes) -> bytes:
    """What a client signs when it posts its keys: they are for this round of this registry only."""
    return context(registry_address, round_id, "keys") + encryption_key + mask_key + seed_commitment


def signed_keys(account_key: str, registry_address: str, round_id: int, encryption_key: bytes,
                mask_key: bytes, seed_commitment: bytes) -> bytes:
    """A Keys message: both public keys, the commitment to the self-mask seed, and the account's
    signature (EIP-191) over their statement."""
    statement = keys_statement(registry_address, round_id, encryption_key, mask_key, seed_commitment)
    signature = Account.sign_message(encode_defunct(primitive=statement), private_key=account_key).signature
    return encryption_key + mask_key + seed_commitment + bytes(signature)


@dataclass(frozen=True)
class PostedKeys:
    encryption: bytes  # X25519 public key the client's shares are encrypted to
    mask: bytes  # X25519 public key its pairwise masks are agreed with
    seed_commitment: bytes  # processor.secagg.seed_commitment of its self-mask seed


@functools.lru_cache(maxsize=4096)  # every look at a round reads its keys again: each is checked once
def read_keys(payload: bytes, sender: str, registry_address: str, round_id: int) -> PostedKeys:
    """The keys of a Keys message; ValueError when it is malformed, not signed by `sender`, or holds
    a key no peer can agree a secret with."""
    if len(payload) != KEYS_BYTES:
        raise ValueError(f"a keys message is {KEYS_BYTES} bytes, this one {len(payload)}")
    encryption, mask = payload[:KEY_BYTES], payload[KEY_BYTES:2 * KEY_BYTES]
    commitment = payload[2 * KEY_BYTES:3 * KEY_BYTES]
    statement = keys_statement(registry_address, round_id, encryption, mask, commitment)
    try:
        signer = Account.recover_message(encode_defunct(primitive=statement), signature=payload[3 * KEY_BYTES:])
    except Exception as exc:  # eth-keys raises several kinds for a malformed signature
        raise ValueError(f"the keys' signature is malformed ({type(exc).__name__})") from exc
    if signer.lower() != sender.lower():
        raise ValueError(f"the keys are signed by {signer}, not by their sender {sender}")
    if encryption == mask:
        raise ValueError("the encryption and mask keys are the same key")
    secagg.check_public_key(encryption, "the encryption key")
    secagg.check_public_key(mask, "the mask key")
    return PostedKeys(encryption, mask, commitment)


def shares_at_once(invited: list[str], previously_keyed, threshold: int) -> bool:
    """Whether a round's clients share their secrets without a key roster: every client it invites
    posted its lasting encryption key in the previous round (`previously_keyed`), and they reach the
    threshold. The organization and each client decide it alike, from the chain alone."""
    return len(invited) >= threshold and all(client in previously_keyed for client in invited)


def keys_before(registry: Registry, round_id: int) -> dict[str, PostedKeys]:
    """The keys posted in the round before `round_id` (none before round 2): whose lasting
    encryption keys are known when round `round_id` opens."""
    return SecureRoundView.of(registry, registry.round(round_id - 1)).keys if round_id > 1 else {}


def pack_roster(addresses: list[str]) -> bytes:
    """A roster message: the addresses, sorted, 20 bytes each."""
    return b"".join(bytes.fromhex(to_checksum_address(a)[2:]) for a in sorted(addresses, key=str.lower))


def read_roster(payload: bytes) -> list[str]:
    """The addresses of a roster message; ValueError when it is malformed."""
    if len(payload) % ADDRESS_BYTES or not payload:
        raise ValueError(f"a roster is a whole number of {ADDRESS_BYTES}-byte addresses, this one {len(payload)} bytes")
    addresses = [to_checksum_address(payload[i:i + ADDRESS_BYTES]) for i in range(0, len(payload), ADDRESS_BYTES)]
    if len(set(addresses)) != len(addresses):
        raise ValueError("a roster names a client twice")
    return addresses


@dataclass
class SecureRoundView:
    """What a round's messages say: each sender's first message of each kind that parses."""
    keys: dict[str, PostedKeys] = field(default_factory=dict)
    shares: dict[str, str] = field(default_factory=dict)  # client -> CID of its encrypted shares
    unmasks: dict[str, bytes] = field(default_factory=dict)  # survivor -> its Unmask payload (read_unmask)
    reveals: dict[str, str] = field(default_factory=dict)  # client -> CID of its revealed shares
    key_roster: list[str] | None = None
    mask_roster: list[str] | None = None
    unmask_roster: list[str] | None = None  # the survivors: whose vectors enter their group's sum
    recovery_roster: list[str] | None = None  # whose secrets the organization asks the shares of
    key_roster_block: int = 0
    mask_roster_block: int = 0
    unmask_roster_block: int = 0
    recovery_roster_block: int = 0
    ignored: list[str] = field(default_factory=list)  # why messages were not taken

    @classmethod
    def of(cls, registry: Registry, info: RoundInfo) -> "SecureRoundView":
        """Round `info`'s messages as they stand on chain."""
        return cls.read(registry.round_messages(info), registry.owner, registry.address, info.round_id)

    @classmethod
    def read(cls, messages: list[RoundMessage], owner: str, registry_address: str, round_id: int) -> "SecureRoundView":
        return cls().taking(messages, owner, registry_address, round_id)

    def taking(self, messages: list[RoundMessage], owner: str, registry_address: str, round_id: int) -> "SecureRoundView":
        """This view with `messages` (those mined after the ones it holds, in order) taken in."""
        for message in messages:
            sender = to_checksum_address(message.sender)
            try:
                self._take(message, sender, owner, registry_address, round_id)
            except ValueError as exc:
                self.ignored.append(f"{message.kind.name.lower()} from {sender}: {exc}")
        return self

    def copy(self) -> "SecureRoundView":
        """A copy whose own records (not the records' values, which are never changed) the caller may change."""
        return replace(self, keys=dict(self.keys), shares=dict(self.shares), unmasks=dict(self.unmasks),
                       reveals=dict(self.reveals), ignored=list(self.ignored))

    def _take(self, message: RoundMessage, sender: str, owner: str, registry_address: str, round_id: int) -> None:
        kind = message.kind
        if kind in ROSTERS:
            if sender.lower() != owner.lower():  # the contract allows none: a different contract's log
                raise ValueError("a roster not from the organization")
            attribute = ROSTERS[kind]
            if getattr(self, attribute) is None:
                setattr(self, attribute, read_roster(message.payload))
                setattr(self, f"{attribute}_block", message.block_number)
        elif kind == MessageKind.KEYS:
            # keys, then the CID of the sender's shares when it shares at once (no key roster)
            if sender not in self.keys:
                keys = read_keys(message.payload[:KEYS_BYTES], sender, registry_address, round_id)
                if any(keys.mask == other.mask for other in self.keys.values()):
                    raise ValueError("its mask key is another client's, posted before")
                self.keys[sender] = keys
                if len(message.payload) > KEYS_BYTES and sender not in self.shares:
                    self.shares[sender] = read_cid(message.payload[KEYS_BYTES:])
        elif kind == MessageKind.UNMASK:
            self.unmasks.setdefault(sender, message.payload)
        else:
            posted = self.shares if kind == MessageKind.SHARES else self.reveals
            if sender not in posted:
                posted[sender] = read_cid(message.payload)

    def excluded(self, group: list[str] | None = None) -> list[str]:
        """The clients on the mask roster (or in `group` of it) that the unmask roster leaves out:
        the dropped ones, whose vectors (if any reached IPFS) stay behind their self masks for good."""
        survivors = set(self.unmask_roster or [])
        return [c for c in (self.mask_roster or [] if group is None else group) if c not in survivors]

    def groups(self, count: int, threshold: int, mask_context: bytes) -> list[list[str]]:
        """The mask roster's groups (processor.secagg.groups_of): each masks and is summed on its own."""
        return secagg.groups_of(self.mask_roster or [], count, threshold, mask_context)


def group_of(groups: list[list[str]], client: str) -> list[str]:
    """The group `client` is in; ValueError when it is in none (it is not on the mask roster)."""
    for group in groups:
        if client in group:
            return group
    raise ValueError(f"{client} is in none of the round's groups: it is not on the mask roster")


def unmask_roster_problem(view: SecureRoundView, submitted: set[str], groups: list[list[str]],
                          threshold: int) -> str | None:
    """Why a client must not unmask by the unmask roster as it stands (None when it may): a
    survivor not on the mask roster or that submitted nothing on chain (its self mask would be
    given away with its pairwise masks), or a group whose sum would have fewer than `threshold`
    updates in it (the organization could then tell a single client's update)."""
    survivors = set(view.unmask_roster or [])
    if not survivors <= set(view.mask_roster or []):
        return "the unmask roster names clients that are not on the mask roster"
    if not survivors <= submitted:
        return "the unmask roster names clients that submitted no update on chain"
    for group in groups:
        inside = sum(client in survivors for client in group)
        if 0 < inside < threshold:
            return f"the unmask roster leaves a group with {inside} updates, fewer than the threshold {threshold}"
    return None


def encode_unmask(seed: bytes, pair_keys: list[bytes]) -> bytes:
    """A survivor's Unmask: its self-mask seed, then its pairwise key with each dropped member of its
    group, in their (sorted) order in the mask roster."""
    return seed + b"".join(pair_keys)


def read_unmask(payload: bytes, dropped: list[str]) -> tuple[bytes, dict[str, bytes]]:
    """The seed and the pairwise keys by dropped client of an Unmask that must name `dropped`;
    ValueError when it has not their number."""
    if len(payload) != KEY_BYTES * (1 + len(dropped)):
        raise ValueError(f"an unmask for {len(dropped)} dropped clients is {KEY_BYTES * (1 + len(dropped))} bytes, "
                         f"this one {len(payload)}")
    keys = {client: payload[KEY_BYTES * (1 + k):KEY_BYTES * (2 + k)] for k, client in enumerate(dropped)}
    return payload[:KEY_BYTES], keys


def read_cid(payload: bytes) -> str:
    """A CID posted as a message; ValueError for anything that is not a short ASCII word."""
    if len(payload) > 100 or not payload.isascii() or not payload.isalnum():
        raise ValueError("not a CID")
    return payload.decode()


Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
HexBlob = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,512}$")]


class _SharesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: str
    round: int = Field(ge=1)
    client: Address
    shares: dict[Address, HexBlob] = Field(max_length=MAX_ROSTER)


def encode_shares_file(kind_format: str, round_id: int, client: str, shares: dict[str, bytes]) -> bytes:
    """A shares file (SHARES_FORMAT: each share encrypted to its holder) or a reveal file
    (REVEAL_FORMAT: the shares of dropped clients' secrets this client held, decrypted), as JSON."""
    return orjson.dumps({"format": kind_format, "round": round_id, "client": to_checksum_address(client),
                         "shares": {to_checksum_address(a): blob.hex() for a, blob in sorted(shares.items())}})


def decode_shares_file(data: bytes, kind_format: str, round_id: int, client: str) -> dict[str, bytes]:
    """The shares of a file `client` posted for round `round_id`, by holder (or by dropped client);
    ValueError when the bytes are not such a file."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"the file is {len(data)} bytes, more than {MAX_FILE_BYTES}")
    try:
        parsed = _SharesFile.model_validate(orjson.loads(data))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"not a shares file: {str(exc).splitlines()[0]}") from exc
    if parsed.format != kind_format or parsed.round != round_id or parsed.client.lower() != client.lower():
        raise ValueError(f"the file is a {parsed.format!r} of {parsed.client} for round {parsed.round}, not a "
                         f"{kind_format!r} of {client} for round {round_id}")
    return {to_checksum_address(a): bytes.fromhex(blob) for a, blob in parsed.shares.items()}
