"""Secure aggregation's cryptographic core: double masking (Bonawitz et al. 2017).

Each client quantizes its clipped update into Z_{2^32}, then adds, for every other client p of its
group, a pseudo-random stream derived from an X25519 agreement with p: with sign +1 when its
address sorts before p's and -1 after, so each pair's two streams cancel in the sum; and a self
mask, the stream of a seed of its own. A client that drops after masking leaves its pairs
uncancelled: the survivors reveal their pairwise keys with it, or its mask secret is rebuilt from
Shamir shares held by the others (sealed with AES-GCM for each holder), and the aggregator
removes the leftover streams. A survivor's self mask is removed with its seed, revealed by itself
or rebuilt from shares. Of one client, only one of the two is ever revealed: a dropped client's
vector stays behind its self mask, a survivor's behind its pairwise masks. The stages follow
Flower's SecAgg+.

Pure functions over bytes and NumPy arrays: no I/O. Every argument may come from an attacker (bytes
read from IPFS), so each is checked and a bad one raises ValueError with the reason. X25519, HKDF,
AES-GCM and the masks' AES-CTR are OpenSSL's (`cryptography`), SHA-256 the standard library's:
pycryptodome's took 3 ms an agreement, 0.4 ms a stream and 65 us an HKDF (OpenSSL's 3 us), and a
client of a 100-client group makes about 200 of each a round. Shamir's scheme is written here (see
PRIME).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from secrets import randbelow
from typing import Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODULUS_BITS = 32  # arithmetic in Z_{2^32}: numpy uint32 wraps, so sums and masks need no explicit mod
MODULUS = 1 << MODULUS_BITS
MASK_DTYPE = np.dtype("<u4")  # little-endian on every platform: the same key gives the same stream

KEY_BYTES = 32  # X25519 keys, shared keys and AES-256 keys
NONCE_BYTES = 12  # AES-GCM nonce
TAG_BYTES = 16  # AES-GCM tag
MAX_LENGTH = 1 << 28  # mask length cap (1 GiB of uint32): a larger claim is an attack or a bug

# Shamir over the prime field of the Mersenne prime 2^521 - 1 (above every 32-byte secret).
# By hand, not pycryptodome's Shamir: its GF(2^128) arithmetic is pure Python bit by bit, and a
# round of 100 clients, each splitting two secrets 67-of-100, took 23 s of it against 0.3 s here.
PRIME = (1 << 521) - 1
_VALUE_BYTES = 66
_INDEX_BYTES = 2  # a share's index, big-endian, before its value
SHARE_BYTES = _INDEX_BYTES + _VALUE_BYTES
MAX_HOLDERS = (1 << (8 * _INDEX_BYTES)) - 1


# --- checks -----------------------------------------------------------------------------------


def _require_bytes(value: object, name: str, length: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")
    return value


def _require_int(value: object, name: str, low: int, high: int) -> int:
    # bool is an int subclass; True as a length or threshold is a bug, not a 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _require_context(context: object) -> bytes:
    context = _require_bytes(context, "context")
    if not context:
        # the context is what makes one round's masks differ from the next one's with the same keys
        raise ValueError("context must not be empty: bind it to the round (e.g. contract, round number)")
    return context


def _require_vector(values: object, name: str) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(values).__name__}")
    if values.dtype != np.uint32:
        raise ValueError(f"{name} must be uint32 (quantize it first), got {values.dtype}")
    if values.size > MAX_LENGTH:
        raise ValueError(f"{name} has {values.size} values, more than the {MAX_LENGTH} allowed")
    return values


def _address(address: object, name: str) -> str:
    if not isinstance(address, str) or not address:
        raise ValueError(f"{name} must be a non-empty string address, got {address!r}")
    return address.lower()


def _addressed_keys(keys: object, name: str) -> dict[str, bytes]:
    """`keys` (address -> 32-byte public key) checked and keyed by lowercase address."""
    if not isinstance(keys, dict):
        raise ValueError(f"{name} must be a dict of address -> key, got {type(keys).__name__}")
    out: dict[str, bytes] = {}
    for address, key in keys.items():
        lower = _address(address, f"an address in {name}")
        if lower in out:
            raise ValueError(f"{name} names {address!r} twice (addresses compare in lowercase)")
        out[lower] = _require_bytes(key, f"{name}[{address!r}]", KEY_BYTES)
    return out


# --- quantization -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantizer:
    """Maps each coordinate of a clipped vector, in [-bound, bound], to an integer in Z_{2^32} so that
    the sum of up to `max_clients` of them cannot wrap.

    Each value becomes one of `levels + 1` integers 0..levels (-bound -> 0, +bound -> levels), with
    levels = floor((2^32 - 1) / max_clients): max_clients of them sum to at most 2^32 - 1.
    """

    bound: float  # every coordinate is clipped to [-bound, bound] first
    max_clients: int

    def __post_init__(self) -> None:
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float, np.floating, np.integer)):
            raise ValueError(f"bound must be a number, got {type(self.bound).__name__}")
        if not math.isfinite(self.bound) or self.bound <= 0:
            raise ValueError(f"bound must be finite and positive, got {self.bound}")
        _require_int(self.max_clients, "max_clients", 1, MODULUS - 1)

    @property
    def levels(self) -> int:
        """The largest integer one client's value maps to."""
        return (MODULUS - 1) // int(self.max_clients)

    @property
    def step(self) -> float:
        """The quantization step: the error bound per coordinate per client is step (stochastic) or step/2."""
        return 2.0 * float(self.bound) / self.levels

    def quantize(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """`values` clipped to [-bound, bound] and mapped to uint32 levels, in the same shape.

        With `rng`, stochastic rounding (up with probability equal to the fractional part), so the
        expected quantized value is the clipped value exactly: rounding errors average out in a sum of
        many clients. Without it, rounding to nearest (deterministic, error at most step/2).
        """
        values = np.asarray(values)
        if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"values must be real numbers, got {values.dtype}")
        if values.size > MAX_LENGTH:
            raise ValueError(f"values has {values.size} entries, more than the {MAX_LENGTH} allowed")
        scaled = values.astype(np.float64)  # a copy: the caller's array is never changed
        if np.isnan(scaled).any():
            raise ValueError("values contain NaN, which has no place in [-bound, bound]")
        bound = float(self.bound)
        np.clip(scaled, -bound, bound, out=scaled)
        scaled += bound
        scaled *= self.levels / (2.0 * bound)  # now in [0, levels]
        if rng is None:
            np.rint(scaled, out=scaled)
        else:
            if not isinstance(rng, np.random.Generator):
                raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
            scaled += rng.random(scaled.shape)
            np.floor(scaled, out=scaled)
        # float rounding may land a hair past levels; never let one client exceed its share of Z_{2^32}
        np.clip(scaled, 0, self.levels, out=scaled)
        return scaled.astype(np.uint32)

    def dequantize_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float64 sum of the `count` clipped vectors whose quantized values sum to `total`."""
        total = _require_vector(total, "total")
        count = _require_int(count, "count", 1, int(self.max_clients))
        return total.astype(np.float64) * self.step - count * float(self.bound)


def add(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """The uint32 sum (mod 2^32) of equally shaped uint32 vectors, one at a time.

    Use this, not np.sum over a stacked array: NumPy sums uint32 into uint64 by default, which breaks
    both the mask cancellation and the wrap-free quantized sum.
    """
    total: np.ndarray | None = None
    for i, vector in enumerate(vectors):
        vector = _require_vector(vector, f"vector {i}")
        if total is None:
            total = vector.copy()
        elif vector.shape != total.shape:
            raise ValueError(f"vector {i} has shape {vector.shape}, the first had {total.shape}")
        else:
            np.add(total, vector, out=total)
    if total is None:
        raise ValueError("no vectors to add")
    return total


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair in raw RFC 7748 encodings."""

    secret: bytes  # 32 bytes, X25519 private scalar encoding
    public: bytes  # 32 bytes, X25519 public key encoding

    def __repr__(self) -> str:  # never print a secret into a log
        return f"KeyPair(public={self.public.hex()})"


def new_key_pair() -> KeyPair:
    """A fresh X25519 key pair from the OS's random source."""
    key = X25519PrivateKey.generate()
    return KeyPair(secret=key.private_bytes_raw(), public=key.public_key().public_bytes_raw())


def _private_key(secret: object) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_require_bytes(secret, "secret", KEY_BYTES))


def _public_key(public: object, name: str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(_require_bytes(public, name, KEY_BYTES))


def public_key(secret: bytes) -> bytes:
    """The public key of `secret`: to check a secret rebuilt from shares against the one published."""
    return _private_key(secret).public_key().public_bytes_raw()


def shared_key(secret: bytes, peer_public: bytes, context: bytes) -> bytes:
    """A 32-byte key only the two parties can compute: X25519 agreement, then HKDF-SHA256 over `context`.

    Symmetric: shared_key(a.secret, b.public, c) == shared_key(b.secret, a.public, c). A different
    `context` gives an unrelated key, so one key pair can serve many rounds without reusing a mask.
    """
    return _agreed_key(_private_key(secret), peer_public, context)


def shared_keys(secret: bytes, peers: dict[str, bytes], context: bytes) -> dict[str, bytes]:
    """shared_key(secret, peers[p], context) for each peer p: the private key is loaded once (loading
    it costs as much as an agreement)."""
    private = _private_key(secret)
    return {peer: _agreed_key(private, public, context) for peer, public in peers.items()}


def _agreed_key(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    context, peer = _require_context(context), _public_key(peer_public, "peer_public")
    try:
        z = private.exchange(peer)
    except ValueError:  # OpenSSL refuses a small-order point: an all-zero secret (RFC 7748 section 6.1)
        raise ValueError("peer_public is not a valid X25519 public key (a small-order point)") from None
    return derive_key(z, context)


def derive_key(material: bytes, context: bytes) -> bytes:
    """A 32-byte key from secret `material` for the use `context` names: HKDF-SHA256 (RFC 5869), no salt."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=context).derive(material)


# --- masks ------------------------------------------------------------------------------------


def pair_key(secret: bytes, me: str, peer: str, peer_public: bytes, context: bytes) -> bytes:
    """The key of the pairwise mask between `me` (holding `secret`) and `peer`: their shared_key over
    `context` and both addresses, so that a client who posts another's public key as its own
    agrees with everyone a key unrelated to that client's (a copied key gives nothing away)."""
    return _pair_key(_private_key(secret), me, peer, peer_public, context)


def _pair_key(private: X25519PrivateKey, me: str, peer: str, peer_public: bytes, context: bytes) -> bytes:
    low, high = sorted((_address(me, "me"), _address(peer, "peer")))
    return _agreed_key(private, peer_public, _require_context(context) + f"|pair|{low}|{high}".encode())


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 values: the AES-256-CTR keystream of `key`, little-endian.

    The counter starts at 0 with no nonce; that is safe because each key is used for one stream only
    (pair_key binds it to the pair and the round's context). OpenSSL's AES (`cryptography`): 0.07 ms
    for a 100,000-value stream against pycryptodome's 0.4, and a client of a 100-client group makes
    100 of them.
    """
    key = _require_bytes(key, "key", KEY_BYTES)
    length = _require_int(length, "length", 0, MAX_LENGTH)
    stream = np.zeros(length, MASK_DTYPE)
    if length:
        buffer = memoryview(stream).cast("B")
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(buffer, buffer)  # in place
    return stream.astype(np.uint32, copy=False)


def _signed_streams(me: str, secret: bytes, peers: dict[str, bytes], length: int, context: bytes) -> np.ndarray:
    """Sum over peers p != me of sign(me, p) * mask_stream(pair_key(secret, me, p, peers[p], context))."""
    total, private = np.zeros(length, np.uint32), _private_key(secret)
    for peer in sorted(peers):
        if peer == me:
            continue
        stream = mask_stream(_pair_key(private, me, peer, peers[peer], context), length)
        if me < peer:
            np.add(total, stream, out=total)
        else:
            np.subtract(total, stream, out=total)  # wraps: adds 2^32 - stream
    return total


def pairwise_mask(me: str, secret: bytes, peers: dict[str, bytes], length: int, context: bytes) -> np.ndarray:
    """The uint32 mask `me` adds: over peers p != me, +stream when me < p, -stream (2^32 - x) when me > p.

    Addresses compare in lowercase; peers[me], if present, is skipped. The two members of a pair derive
    the same stream with opposite signs, so the masks of a full set of clients sum to 0 mod 2^32.
    """
    me = _address(me, "me")
    peers = _addressed_keys(peers, "peers")
    length = _require_int(length, "length", 0, MAX_LENGTH)
    context = _require_context(context)
    _private_key(secret)  # fail on a bad secret even with no peers to reach the check in shared_key
    if not any(peer != me for peer in peers):
        raise ValueError("peers holds no client but me: a mask would be zero and reveal the vector")
    return _signed_streams(me, secret, peers, length, context)


def self_mask(seed: bytes, length: int, context: bytes) -> np.ndarray:
    """The uint32 self mask of a client: the stream of a key derived from its secret `seed` and `context`.

    The second mask of double masking (Bonawitz et al. 2017): a client whose pairwise masks are
    removed (it counted as dropped) keeps its vector hidden behind this one, whose seed is revealed
    only for the clients whose vectors are in the sum.
    """
    seed = _require_bytes(seed, "seed", KEY_BYTES)
    context = _require_context(context)
    return mask_stream(derive_key(seed, b"self mask|" + context), length)


def seed_commitment(seed: bytes, context: bytes) -> bytes:
    """SHA-256 of the context and a 32-byte random seed: binds a client to its self-mask seed before
    anyone knows it (hiding: the seed has 256 bits of entropy), so that a revealed or rebuilt seed
    can be checked."""
    seed = _require_bytes(seed, "seed", KEY_BYTES)
    return hashlib.sha256(b"self mask seed|" + _require_context(context) + seed).digest()


def mask(values: np.ndarray, me: str, secret: bytes, peers: dict[str, bytes], context: bytes,
         seed: bytes) -> np.ndarray:
    """`values` (uint32, any shape) plus `me`'s pairwise mask and its self mask of `seed`, mod 2^32:
    uniform to anyone who lacks either."""
    values = _require_vector(values, "values")
    masked = pairwise_mask(me, secret, peers, values.size, context)
    np.add(masked, self_mask(seed, values.size, context), out=masked)
    np.add(masked, values.reshape(-1), out=masked)
    return masked.reshape(values.shape)


def unmask_sum(total: np.ndarray, survivors: dict[str, bytes], context: bytes, seeds: dict[str, bytes],
               dropped_secrets: dict[str, bytes], dropped_pair_keys: dict[str, dict[str, bytes]] | None = None
               ) -> np.ndarray:
    """The plain uint32 sum of the survivors' vectors, from `total`, the sum of their masked vectors.

    Each survivor's self mask is removed with its seed (`seeds`, one per survivor). The pairwise masks
    among survivors cancelled already; each survivor's stream with a dropped client d did not. They
    are removed with d's mask secret (`dropped_secrets`, rebuilt from shares: pairwise_mask(d, ...)
    over the survivors is exactly their negation), or else with the pairwise keys each survivor
    revealed with d (`dropped_pair_keys[d][survivor]`, every survivor's).

    `survivors` (address -> mask public key) must be exactly the clients whose masked vectors are in
    `total`, and no survivor may be dropped: its pairwise secret with its seed would unmask its vector.
    """
    total = _require_vector(total, "total")
    survivors = _addressed_keys(survivors, "survivors")
    context = _require_context(context)
    if not survivors:
        raise ValueError("no survivors: there is no sum to unmask")
    seeds = {_address(a, "an address in seeds"): _require_bytes(s, f"seeds[{a!r}]", KEY_BYTES)
             for a, s in _mapping(seeds, "seeds").items()}
    if set(seeds) != set(survivors):
        raise ValueError("seeds must hold the self-mask seed of every survivor and of no one else")
    secrets_by = {_address(a, "an address in dropped_secrets"): _require_bytes(s, f"dropped_secrets[{a!r}]", KEY_BYTES)
                  for a, s in _mapping(dropped_secrets, "dropped_secrets").items()}
    pair_keys = {_address(a, "an address in dropped_pair_keys"): _addressed_keys(keys, f"dropped_pair_keys[{a!r}]")
                 for a, keys in _mapping(dropped_pair_keys or {}, "dropped_pair_keys").items()}
    for dropped in set(secrets_by) | set(pair_keys):
        if dropped in survivors:
            raise ValueError(f"{dropped!r} is both a survivor and dropped: its masked vector would be exposed")
    result = total.reshape(-1).copy()
    for address in sorted(survivors):
        np.subtract(result, self_mask(seeds[address], result.size, context), out=result)
    for dropped, secret in secrets_by.items():
        np.add(result, _signed_streams(dropped, secret, survivors, result.size, context), out=result)
    for dropped, keys in pair_keys.items():
        if dropped in secrets_by:
            continue
        if set(keys) != set(survivors):
            raise ValueError(f"the pairwise keys with {dropped!r} must be every survivor's, and only theirs")
        for survivor, key in keys.items():
            stream = mask_stream(key, result.size)  # what `survivor` added with sign(survivor, dropped)
            (np.subtract if survivor < dropped else np.add)(result, stream, out=result)
    return result.reshape(total.shape)


def _mapping(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict keyed by address, got {type(value).__name__}")
    lowered = [_address(a, f"an address in {name}") for a in value]
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"{name} names an address twice (addresses compare in lowercase)")
    return value


def check_public_key(public: bytes, name: str = "public key") -> bytes:
    """`public` when it is an X25519 public key that agrees a secret with anyone; ValueError for a
    small-order point (every agreement with it gives the all-zero secret, refused by OpenSSL), which
    would leave its owner's peers unable to mask."""
    key = _public_key(public, name)
    try:
        X25519PrivateKey.generate().exchange(key)
    except ValueError:
        raise ValueError(f"{name} is not a valid X25519 public key (a small-order point)") from None
    return bytes(public)


def groups_of(roster: list[str], count: int, threshold: int, context: bytes) -> list[list[str]]:
    """The round's clients split into at most `count` groups of at least `threshold` each (one group
    when there are fewer than 2 x threshold), each summed on its own: a client masks only against
    its group. Who is in which group follows from the roster and the round's context alone (a hash
    of each address orders them, then they are dealt in turn), so every party computes the same
    groups and no one picks them."""
    context = _require_context(context)
    count = _require_int(count, "count", 1, MAX_HOLDERS)
    threshold = _require_int(threshold, "threshold", 1, MAX_HOLDERS)
    members = sorted({_address(a, "a client on the roster"): a for a in roster}.items(),
                     key=lambda item: hashlib.sha256(b"group|" + context + item[0].encode()).digest())
    number = max(1, min(count, len(members) // threshold))
    return [sorted((a for _, a in members[k::number]), key=str.lower) for k in range(number)]


# --- secret sharing ---------------------------------------------------------------------------


def split_secret(secret: bytes, holders: list[str], threshold: int) -> dict[str, bytes]:
    """Shamir `threshold`-of-n shares of a 32-byte secret, one per holder.

    Holders are sorted by lowercase address and get indices 1..n in that order. The secret is the
    constant term of a random polynomial of degree threshold - 1 over GF(PRIME), whose other
    coefficients come from the OS's CSPRNG; each share is SHARE_BYTES bytes: the index (2 bytes,
    big-endian), then the polynomial's value there (big-endian).
    """
    secret = _require_bytes(secret, "secret", KEY_BYTES)
    if not isinstance(holders, (list, tuple)):
        raise ValueError(f"holders must be a list of addresses, got {type(holders).__name__}")
    by_lower: dict[str, str] = {}
    for holder in holders:
        lower = _address(holder, "a holder")
        if lower in by_lower:
            raise ValueError(f"holders names {holder!r} twice (addresses compare in lowercase)")
        by_lower[lower] = holder
    n = len(by_lower)
    if n > MAX_HOLDERS:
        raise ValueError(f"at most {MAX_HOLDERS} holders, got {n}")
    if n < 2:
        raise ValueError(f"sharing needs at least 2 holders, got {n}")
    threshold = _require_int(threshold, "threshold", 2, n)
    coefficients = [int.from_bytes(secret, "big")] + [randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[str, bytes] = {}
    for index, lower in enumerate(sorted(by_lower), 1):
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * index + coefficient) % PRIME
        shares[by_lower[lower]] = index.to_bytes(_INDEX_BYTES, "big") + value.to_bytes(_VALUE_BYTES, "big")
    return shares


def share_index(share: bytes) -> int:
    """The index (1..n) a share was made for, after checking its length and value."""
    share = _require_bytes(share, "a share", SHARE_BYTES)
    index = int.from_bytes(share[:_INDEX_BYTES], "big")
    if index == 0:  # the polynomial at 0 is the secret itself: never a share
        raise ValueError("a share has index 0, which no holder is given")
    if int.from_bytes(share[_INDEX_BYTES:], "big") >= PRIME:
        raise ValueError("a share's value is not an element of the field")
    return index


def _combine(shares: list[bytes]) -> bytes:
    """The polynomial's value at 0, by Lagrange interpolation over the shares' points."""
    points = [(share_index(s), int.from_bytes(s[_INDEX_BYTES:], "big")) for s in shares]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator = denominator = 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >> (8 * KEY_BYTES):
        raise ValueError("the shares do not give a 32-byte secret: at least one of them is corrupt")
    return secret.to_bytes(KEY_BYTES, "big")


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    """The 32-byte secret rebuilt from at least `threshold` shares made by split_secret.

    Refuses fewer than `threshold` shares (pycryptodome would silently return a wrong secret), shares of
    the wrong length, index 0 and duplicate indices. With more than `threshold`, it rebuilds from the
    first and from the last `threshold` and refuses when they disagree (some share is corrupt). A corrupt
    share can still go unnoticed with exactly `threshold` shares: compare public_key(result) with the
    public key the owner published.
    """
    if not isinstance(shares, (list, tuple)):
        raise ValueError(f"shares must be a list of bytes, got {type(shares).__name__}")
    threshold = _require_int(threshold, "threshold", 2, MAX_HOLDERS)
    shares = [_require_bytes(s, f"share {i}", SHARE_BYTES) for i, s in enumerate(shares)]
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot rebuild a secret shared {threshold}-of-n")
    indices = [share_index(s) for s in shares]
    if len(set(indices)) != len(indices):
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"shares repeat indices {duplicates}: each holder's share counts once")
    secret = _combine(shares[:threshold])
    if len(shares) > threshold and _combine(shares[-threshold:]) != secret:
        raise ValueError("the shares are inconsistent: at least one of them is corrupt")
    return secret


def recover(shares: list[bytes], threshold: int, valid, tries: int = 64) -> bytes | None:
    """The secret that `valid(secret)` accepts, rebuilt from `threshold` of `shares`, or None.

    A corrupt share (a hostile holder's) gives a wrong secret: windows of `threshold` shares,
    rotating over the list, are tried first (one corrupt share, or several placed together, costs
    a few more tries), then up to `tries` other subsets drawn at random. Shares that fail their
    checks (length, index, value) are left out first, and of shares that repeat an index, both.
    """
    usable = []
    for share in shares:
        try:
            share_index(share)
        except ValueError:
            continue
        usable.append(bytes(share))
    indices = [share_index(s) for s in usable]
    usable = [s for i, s in zip(indices, usable) if indices.count(i) == 1]  # a repeated index: both suspect
    if len(usable) < threshold:
        return None
    windows = [[usable[(start + k) % len(usable)] for k in range(threshold)]
               for start in range(1 if len(usable) == threshold else len(usable))]
    draw = random.Random(len(usable))  # which subsets need not be secret: only which ones give `valid`
    others = [draw.sample(usable, threshold) for _ in range(tries if len(usable) > threshold + 1 else 0)]
    for subset in windows + others:
        try:
            secret = _combine(subset)
        except ValueError:  # no 32-byte secret: a corrupt share is in this subset
            continue
        if valid(secret):
            return secret
    return None


# --- sealed messages --------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM of `plaintext` under `key`, authenticating `associated` too: nonce || ciphertext || tag.

    The nonce is 12 random bytes, so one key may seal many messages (well under 2^32).
    """
    key = _require_bytes(key, "key", KEY_BYTES)
    plaintext = _require_bytes(plaintext, "plaintext")
    associated = _require_bytes(associated, "associated")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)  # the tag (TAG_BYTES) comes last


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of `sealed` (from seal); ValueError unless `key` and `associated` authenticate it."""
    key = _require_bytes(key, "key", KEY_BYTES)
    sealed = _require_bytes(sealed, "sealed")
    associated = _require_bytes(associated, "associated")
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"sealed message is {len(sealed)} bytes, shorter than nonce and tag ({NONCE_BYTES + TAG_BYTES})")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise ValueError("sealed message does not authenticate: wrong key, tampered bytes or other associated data") from None
