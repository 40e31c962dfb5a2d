"""Secure aggregation's core (processor/secagg.py): quantization, masks that cancel, dropout recovery,
Shamir shares and sealed messages, on fixed keys and seeds so every statistical check is repeatable."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import secagg
from processor.secagg import KeyPair, Quantizer

CONTEXT = b"contract 0xabc / round 7"
ADDRESSES = [  # mixed case on purpose: the sign convention compares lowercase
    "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4",
    "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",
    "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db",
    "0x78731D3Ca6b7E34aC0F824c42a7cC18A495cabaB",
    "0x617F2E2fD72FD9D5503197092aC168c91465E7f2",
]


def fixed_key_pair(i: int) -> KeyPair:
    """A repeatable key pair (the tests' statistics must not depend on the OS's random source)."""
    secret = bytes([i + 1]) * 32
    return KeyPair(secret=secret, public=secagg.public_key(secret))


@pytest.fixture(scope="module")
def clients() -> dict[str, KeyPair]:
    return {address: fixed_key_pair(i) for i, address in enumerate(ADDRESSES)}


SEEDS = {address: bytes([100 + i]) * 32 for i, address in enumerate(ADDRESSES)}  # self-mask seeds


def publics(clients: dict[str, KeyPair]) -> dict[str, bytes]:
    return {address: pair.public for address, pair in clients.items()}


def plain_vectors(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    quantizer = Quantizer(bound=1.0, max_clients=10)
    return {i: quantizer.quantize(rng.uniform(-1, 1, length), rng) for i in range(n)}


# --- quantization -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    bound=st.floats(1e-3, 1e3),
    max_clients=st.integers(1, 10_000),
    k=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    stochastic=st.booleans(),
)
def test_dequantized_sum_is_the_float_sum_within_k_steps(bound, max_clients, k, seed, stochastic):
    k = min(k, max_clients)
    quantizer = Quantizer(bound=bound, max_clients=max_clients)
    rng = np.random.default_rng(seed)
    vectors = [rng.uniform(-1.5 * bound, 1.5 * bound, 200) for _ in range(k)]  # some need clipping
    quantized = [quantizer.quantize(v, rng if stochastic else None) for v in vectors]
    assert all(q.dtype == np.uint32 for q in quantized)
    total = quantizer.dequantize_sum(secagg.add(quantized), k)
    expected = sum(np.clip(v, -bound, bound) for v in vectors)
    per_client = quantizer.step if stochastic else quantizer.step / 2
    # a few ulps of float64 on top of the quantization error bound
    assert np.all(np.abs(total - expected) <= k * per_client * (1 + 1e-9) + 1e-12 * k * bound)


@pytest.mark.parametrize("max_clients", [1, 2, 3, 7, 1000, 2**32 - 1])
def test_extremes_never_wrap_even_with_max_clients(max_clients):
    quantizer = Quantizer(bound=2.5, max_clients=max_clients)
    top = quantizer.quantize(np.array([2.5, 1e30, np.inf]))
    bottom = quantizer.quantize(np.array([-2.5, -1e30, -np.inf]))
    assert list(top) == [quantizer.levels] * 3 and list(bottom) == [0] * 3
    clients = min(max_clients, 1000)  # the same sum as max_clients copies, without the loop
    total = np.array([quantizer.levels * max_clients, 0], dtype=np.uint64)
    assert total[0] <= 2**32 - 1  # max_clients copies of +bound fit in Z_{2^32}
    total = total.astype(np.uint32)
    np.testing.assert_allclose(quantizer.dequantize_sum(total, max_clients), [2.5 * max_clients, -2.5 * max_clients])
    summed = secagg.add([top[:1]] * clients)
    assert int(summed[0]) == quantizer.levels * clients  # no wrap along the way either


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    quantizer = Quantizer(bound=1.0, max_clients=4)
    value = -1.0 + 0.3 * quantizer.step * 2 + 12345 * quantizer.step  # 0.6 of the way between two levels
    values = np.full(40_000, value)
    stochastic = quantizer.quantize(values, np.random.default_rng(1)).astype(np.float64) * quantizer.step - 1.0
    nearest = quantizer.quantize(values).astype(np.float64) * quantizer.step - 1.0
    assert set(np.unique(stochastic - value).round(12)) <= {round(-0.6 * quantizer.step, 12), round(0.4 * quantizer.step, 12)}
    # the mean error's standard deviation is 0.49 step / 200: 0.02 step is 8 of them
    assert abs(np.mean(stochastic - value)) < 0.02 * quantizer.step
    assert np.mean(nearest - value) == pytest.approx(0.4 * quantizer.step, rel=1e-6)


def test_quantize_keeps_the_shape_and_leaves_the_input_alone():
    quantizer = Quantizer(bound=1.0, max_clients=3)
    values = np.array([[0.5, -2.0], [3.0, 0.0]], np.float32)
    before = values.copy()
    assert quantizer.quantize(values).shape == (2, 2)
    np.testing.assert_array_equal(values, before)


@pytest.mark.parametrize("bound, max_clients", [(0.0, 3), (-1.0, 3), (float("nan"), 3), (float("inf"), 3), (1.0, 0), (1.0, 2**32), (1.0, True), (1.0, 2.0)])
def test_bad_quantizers_are_refused(bound, max_clients):
    with pytest.raises(ValueError):
        Quantizer(bound=bound, max_clients=max_clients)


def test_quantizer_refuses_nan_bad_totals_and_too_many_clients():
    quantizer = Quantizer(bound=1.0, max_clients=3)
    with pytest.raises(ValueError, match="NaN"):
        quantizer.quantize(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="uint32"):
        quantizer.dequantize_sum(np.zeros(3, np.int64), 2)
    with pytest.raises(ValueError, match="count"):
        quantizer.dequantize_sum(np.zeros(3, np.uint32), 4)  # more than max_clients: may have wrapped
    with pytest.raises(ValueError, match="count"):
        quantizer.dequantize_sum(np.zeros(3, np.uint32), 0)


# --- keys ---------------------------------------------------------------------------------------


def test_shared_key_is_symmetric_and_bound_to_the_context():
    a, b, c = secagg.new_key_pair(), secagg.new_key_pair(), secagg.new_key_pair()
    assert len(a.secret) == len(a.public) == 32 and secagg.public_key(a.secret) == a.public
    ab = secagg.shared_key(a.secret, b.public, CONTEXT)
    assert len(ab) == 32
    assert ab == secagg.shared_key(b.secret, a.public, CONTEXT)
    assert ab != secagg.shared_key(a.secret, b.public, CONTEXT + b"!")
    assert ab != secagg.shared_key(a.secret, c.public, CONTEXT)
    assert a.secret.hex() not in repr(a)


@pytest.mark.parametrize(
    "secret, public, context, reason",
    [
        (b"\x01" * 31, None, CONTEXT, "secret must be 32 bytes"),
        ("a" * 32, None, CONTEXT, "secret must be bytes"),
        (None, b"\x09" * 33, CONTEXT, "peer_public must be 32 bytes"),
        (None, bytes(32), CONTEXT, "not a valid X25519 public key"),  # small-order point
        (None, b"\x01" + bytes(31), CONTEXT, "not a valid X25519 public key"),
        (None, None, b"", "context must not be empty"),
        (None, None, "round 7", "context must be bytes"),
    ],
)
def test_shared_key_refuses_bad_input_clearly(secret, public, context, reason):
    pair = fixed_key_pair(0)
    with pytest.raises(ValueError, match=reason):
        secagg.shared_key(pair.secret if secret is None else secret, fixed_key_pair(1).public if public is None else public, context)


# --- masks --------------------------------------------------------------------------------------


def test_mask_stream_is_deterministic_keyed_and_fast():
    key = bytes(range(32))
    stream = secagg.mask_stream(key, 1000)
    assert stream.dtype == np.uint32 and stream.shape == (1000,)
    np.testing.assert_array_equal(stream, secagg.mask_stream(key, 1000))
    np.testing.assert_array_equal(stream[:10], secagg.mask_stream(key, 10))  # a prefix of the same stream
    assert not np.array_equal(stream, secagg.mask_stream(bytes(range(1, 33)), 1000))
    assert secagg.mask_stream(key, 0).shape == (0,)
    best = min(_timed(lambda: secagg.mask_stream(key, 1_000_000)) for _ in range(3))
    assert best < 0.05, f"1M mask values took {best * 1e3:.1f} ms"


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@pytest.mark.parametrize("key, length", [(b"k" * 16, 10), (b"k" * 32, -1), (b"k" * 32, 1.5), (b"k" * 32, True), (b"k" * 32, 2**40)])
def test_mask_stream_refuses_bad_input(key, length):
    with pytest.raises(ValueError):
        secagg.mask_stream(key, length)


def test_pairwise_signs_follow_lowercase_address_order(clients):
    low, high = sorted(ADDRESSES[:2], key=str.lower)
    peers = {low: clients[low].public, high: clients[high].public}
    stream = secagg.mask_stream(secagg.pair_key(clients[low].secret, low, high, clients[high].public, CONTEXT), 50)
    np.testing.assert_array_equal(secagg.pairwise_mask(low, clients[low].secret, peers, 50, CONTEXT), stream)
    np.testing.assert_array_equal(secagg.pairwise_mask(high.upper().replace("0X", "0x"), clients[high].secret, peers, 50, CONTEXT), np.uint32(0) - stream)


def test_masks_of_five_clients_cancel_exactly_once_their_self_masks_are_removed(clients):
    plain = plain_vectors(5, 1000)
    peers = publics(clients)
    masked = [secagg.mask(plain[i], address, clients[address].secret, peers, CONTEXT, SEEDS[address])
              for i, address in enumerate(ADDRESSES)]
    for i in range(5):
        assert masked[i].dtype == np.uint32 and np.mean(masked[i] == plain[i]) < 0.01
    total = secagg.add(masked)
    assert np.mean(total == secagg.add(plain.values())) < 0.01  # the self masks are still in the sum
    np.testing.assert_array_equal(secagg.unmask_sum(total, peers, CONTEXT, SEEDS, {}), secagg.add(plain.values()))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), shape=st.sampled_from([(0,), (1,), (7,), (3, 4)]), seed=st.integers(0, 2**32 - 1))
def test_masks_cancel_for_any_group_and_shape(n, shape, seed):
    rng = np.random.default_rng(seed)
    pairs = {f"0x{i:040x}": fixed_key_pair(i) for i in range(n)}
    seeds = {address: bytes([i]) * 32 for i, address in enumerate(pairs)}
    peers = publics(pairs)
    plain = [rng.integers(0, 2**32, shape, dtype=np.uint32) for _ in range(n)]
    masked = [secagg.mask(p, address, pairs[address].secret, peers, CONTEXT, seeds[address])
              for p, address in zip(plain, pairs)]
    assert all(m.shape == shape for m in masked)
    np.testing.assert_array_equal(secagg.unmask_sum(secagg.add(masked), peers, CONTEXT, seeds, {}),
                                  secagg.add(plain).reshape(shape))


def test_a_masked_vector_looks_uniform_and_unrelated_to_the_plain_one(clients):
    quantizer = Quantizer(bound=1.0, max_clients=5)
    ramp = quantizer.quantize(np.linspace(-1, 1, 10_000))  # as structured as a plain vector gets
    masked = secagg.mask(ramp, ADDRESSES[0], clients[ADDRESSES[0]].secret, publics(clients), CONTEXT,
                         SEEDS[ADDRESSES[0]]).astype(np.float64)
    sigma = 2**32 / np.sqrt(12)  # a uniform value's standard deviation
    assert abs(masked.mean() - 2**31) < 4 * sigma / np.sqrt(10_000)
    assert masked.var() / sigma**2 == pytest.approx(1.0, abs=0.05)
    assert abs(np.corrcoef(masked, ramp.astype(np.float64))[0, 1]) < 0.05
    counts = np.bincount((masked // 2**28).astype(int), minlength=16)  # top 4 bits
    chi_square = float(((counts - 625) ** 2 / 625).sum())
    assert chi_square < 37.7  # the 0.999 quantile with 15 degrees of freedom
    low_bits = np.bincount((masked.astype(np.uint32) & 15).astype(int), minlength=16)
    assert float(((low_bits - 625) ** 2 / 625).sum()) < 37.7


def test_masking_refuses_bad_input(clients):
    me = ADDRESSES[0]
    secret, seed = clients[me].secret, SEEDS[me]
    with pytest.raises(ValueError, match="uint32"):
        secagg.mask(np.zeros(4, np.float32), me, secret, publics(clients), CONTEXT, seed)
    with pytest.raises(ValueError, match="numpy array"):
        secagg.mask([1, 2, 3], me, secret, publics(clients), CONTEXT, seed)
    with pytest.raises(ValueError, match="no client but me"):
        secagg.mask(np.zeros(4, np.uint32), me, secret, {me.lower(): clients[me].public}, CONTEXT, seed)
    with pytest.raises(ValueError, match="twice"):
        secagg.mask(np.zeros(4, np.uint32), me, secret, {ADDRESSES[1]: clients[ADDRESSES[1]].public, ADDRESSES[1].lower(): clients[ADDRESSES[1]].public}, CONTEXT, seed)
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.mask(np.zeros(4, np.uint32), me, secret, {ADDRESSES[1]: b"short"}, CONTEXT, seed)
    with pytest.raises(ValueError, match="not a valid X25519"):
        secagg.mask(np.zeros(4, np.uint32), me, secret, {ADDRESSES[1]: bytes(32)}, CONTEXT, seed)
    with pytest.raises(ValueError, match="address"):
        secagg.mask(np.zeros(4, np.uint32), "", secret, publics(clients), CONTEXT, seed)
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        secagg.mask(np.zeros(4, np.uint32), me, secret, publics(clients), CONTEXT, b"short")


def test_a_small_order_public_key_is_refused_before_anyone_masks_with_it(clients):
    assert secagg.check_public_key(clients[ADDRESSES[0]].public) == clients[ADDRESSES[0]].public
    for point in (bytes(32), (1).to_bytes(32, "little")):  # the identity and a point of order 4 (RFC 7748)
        with pytest.raises(ValueError, match="small-order"):
            secagg.check_public_key(point)


# --- dropout recovery ---------------------------------------------------------------------------


def test_two_dropouts_are_recovered_from_three_survivors_shares_or_pairwise_keys(clients):
    threshold = 3
    peers = publics(clients)
    plain = dict(zip(ADDRESSES, plain_vectors(5, 2000, seed=3).values()))
    # stage 1: each client shares its mask secret with everyone (sealed per holder in the protocol)
    shares = {owner: secagg.split_secret(pair.secret, ADDRESSES, threshold) for owner, pair in clients.items()}
    # stage 2: everyone masks against all four others; two then drop before their vectors arrive
    masked = {a: secagg.mask(plain[a], a, clients[a].secret, peers, CONTEXT, SEEDS[a]) for a in ADDRESSES}
    dropped = [ADDRESSES[1], ADDRESSES[3]]
    survivors = {a: peers[a] for a in ADDRESSES if a not in dropped}
    seeds = {a: SEEDS[a] for a in survivors}
    total = secagg.add(masked[a] for a in survivors)
    plain_sum = secagg.add(plain[a] for a in survivors)
    # stage 3: the three survivors hand in their shares of each dropped client's secret
    recovered = {d: secagg.combine_shares([shares[d][s] for s in survivors], threshold) for d in dropped}
    assert all(secagg.public_key(recovered[d]) == peers[d] for d in dropped)
    np.testing.assert_array_equal(secagg.unmask_sum(total, survivors, CONTEXT, seeds, recovered), plain_sum)
    # or each survivor hands in its own pairwise key with each dropped client: no share at all
    pair_keys = {d: {s: secagg.pair_key(clients[s].secret, s, d, peers[d], CONTEXT) for s in survivors} for d in dropped}
    np.testing.assert_array_equal(secagg.unmask_sum(total, survivors, CONTEXT, seeds, {}, pair_keys), plain_sum)
    with pytest.raises(ValueError, match="every survivor's"):
        partial = {d: dict(list(keys.items())[:2]) for d, keys in pair_keys.items()}
        secagg.unmask_sum(total, survivors, CONTEXT, seeds, {}, partial)
    with pytest.raises(ValueError, match="both a survivor and dropped"):
        secagg.unmask_sum(total, survivors, CONTEXT, seeds, {ADDRESSES[0].lower(): clients[ADDRESSES[0]].secret})
    with pytest.raises(ValueError, match="no survivors"):
        secagg.unmask_sum(total, {}, CONTEXT, {}, recovered)
    with pytest.raises(ValueError, match="every survivor"):
        secagg.unmask_sum(total, survivors, CONTEXT, {ADDRESSES[0]: SEEDS[ADDRESSES[0]]}, recovered)


def test_a_dropped_clients_vector_stays_hidden_behind_its_self_mask_when_its_secret_is_recovered(clients):
    """Double masking: the dropped client's masked vector did reach IPFS (it was late); with its
    mask secret rebuilt, every pairwise mask is known, and what is left is still its self mask."""
    peers = publics(clients)
    quantizer = Quantizer(bound=1.0, max_clients=5)
    late = ADDRESSES[2]
    ramp = quantizer.quantize(np.linspace(-1, 1, 10_000))
    masked = secagg.mask(ramp, late, clients[late].secret, peers, CONTEXT, SEEDS[late])
    without_pairs = masked - secagg.pairwise_mask(late, clients[late].secret, peers, ramp.size, CONTEXT)
    assert abs(np.corrcoef(without_pairs.astype(np.float64), ramp.astype(np.float64))[0, 1]) < 0.05
    assert np.mean(without_pairs == ramp) < 0.01
    # only with its seed too (which no honest client reveals of a dropped client) does it come out
    np.testing.assert_array_equal(without_pairs - secagg.self_mask(SEEDS[late], ramp.size, CONTEXT), ramp)


def test_unmask_sum_without_dropouts_removes_only_the_self_masks(clients):
    peers = publics(clients)
    plain = plain_vectors(5, 100, seed=4)
    total = secagg.add(secagg.mask(plain[i], a, clients[a].secret, peers, CONTEXT, SEEDS[a]) for i, a in enumerate(ADDRESSES))
    np.testing.assert_array_equal(secagg.unmask_sum(total, peers, CONTEXT, SEEDS, {}), secagg.add(plain.values()))


def test_a_seed_is_bound_to_its_commitment_and_context():
    commitment = secagg.seed_commitment(SEEDS[ADDRESSES[0]], CONTEXT)
    assert len(commitment) == 32 and commitment == secagg.seed_commitment(SEEDS[ADDRESSES[0]], CONTEXT)
    assert commitment != secagg.seed_commitment(SEEDS[ADDRESSES[1]], CONTEXT)
    assert commitment != secagg.seed_commitment(SEEDS[ADDRESSES[0]], CONTEXT + b"/8")


def test_groups_are_the_same_for_everyone_and_each_holds_the_threshold():
    roster = [f"0x{i:040x}" for i in range(10)]
    groups = secagg.groups_of(roster, 3, 3, CONTEXT)
    assert [len(g) for g in groups] == [4, 3, 3] and sorted(sum(groups, [])) == roster
    assert secagg.groups_of(list(reversed(roster)), 3, 3, CONTEXT) == groups  # the roster's order does not matter
    assert secagg.groups_of(roster, 3, 3, CONTEXT + b"/8") != groups  # another round, other groups
    assert len(secagg.groups_of(roster, 3, 4, CONTEXT)) == 2  # 10 clients hold two groups of at least 4
    assert secagg.groups_of(roster, 3, 6, CONTEXT) == [roster]  # and one of at least 6
    assert secagg.groups_of(roster, 1, 2, CONTEXT) == [roster]


# --- Shamir -------------------------------------------------------------------------------------


def test_any_threshold_shares_recover_the_secret():
    secret = bytes(range(32))
    shares = secagg.split_secret(secret, ADDRESSES, 3)
    assert set(shares) == set(ADDRESSES)
    by_index = sorted(ADDRESSES, key=str.lower)
    assert [secagg.share_index(shares[a]) for a in by_index] == [1, 2, 3, 4, 5]
    assert all(len(s) == secagg.SHARE_BYTES == 68 for s in shares.values())
    for subset in itertools.combinations(shares.values(), 3):
        assert secagg.combine_shares(list(subset), 3) == secret
    assert secagg.combine_shares(list(shares.values()), 3) == secret  # more than needed is fine


def test_fewer_than_threshold_shares_are_refused():
    secret = bytes(range(32))
    shares = list(secagg.split_secret(secret, ADDRESSES, 3).values())
    # interpolation itself takes whatever it gets: two shares of a 3-of-5 give a wrong value
    with pytest.raises(ValueError, match="32-byte secret"):
        secagg._combine(shares[:2])  # a random field element is above 2^256 but for odds of 2^-265
    with pytest.raises(ValueError, match="2 shares cannot rebuild a secret shared 3-of-n"):
        secagg.combine_shares(shares[:2], 3)


def test_duplicate_malformed_and_inconsistent_shares_are_refused():
    shares = list(secagg.split_secret(bytes(range(32)), ADDRESSES, 3).values())
    with pytest.raises(ValueError, match="repeat indices"):
        secagg.combine_shares([shares[0], shares[0], shares[1]], 3)
    relabelled = shares[0][:2] + shares[1][2:]  # the second share claiming the first one's index
    with pytest.raises(ValueError, match="repeat indices"):
        secagg.combine_shares([shares[0], relabelled, shares[2]], 3)
    with pytest.raises(ValueError, match="68 bytes"):
        secagg.combine_shares([shares[0][:-1], shares[1], shares[2]], 3)
    with pytest.raises(ValueError, match="bytes"):
        secagg.combine_shares([shares[0].hex(), shares[1], shares[2]], 3)
    with pytest.raises(ValueError, match="index 0"):
        secagg.combine_shares([bytes(2) + shares[0][2:], shares[1], shares[2]], 3)
    with pytest.raises(ValueError, match="threshold"):
        secagg.combine_shares(shares, 1)
    corrupt = shares[3][:10] + bytes([shares[3][10] ^ 1]) + shares[3][11:]
    with pytest.raises(ValueError, match="inconsistent|corrupt"):
        secagg.combine_shares(shares[:3] + [corrupt], 3)


@pytest.mark.parametrize("threshold", [1, 0, 6, True])
def test_split_refuses_thresholds_outside_two_to_n(threshold):
    with pytest.raises(ValueError, match="threshold"):
        secagg.split_secret(bytes(32), ADDRESSES, threshold)


def test_split_refuses_bad_secrets_and_holders():
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.split_secret(bytes(16), ADDRESSES, 3)
    with pytest.raises(ValueError, match="twice"):
        secagg.split_secret(bytes(32), ADDRESSES + [ADDRESSES[0].lower()], 3)
    with pytest.raises(ValueError, match="at least 2 holders"):
        secagg.split_secret(bytes(32), ADDRESSES[:1], 2)


def test_recover_steps_over_a_corrupt_share_and_gives_up_on_a_bad_secret():
    secret = bytes(range(32))
    shares = list(secagg.split_secret(secret, ADDRESSES, 3).values())
    corrupt = shares[0][:5] + bytes([shares[0][5] ^ 1]) + shares[0][6:]
    valid = lambda candidate: candidate == secret  # noqa: E731 (the owner's commitment, in the protocol)
    assert secagg.recover([corrupt] + shares[1:], 3, valid) == secret
    assert secagg.recover([corrupt] + shares[1:3], 3, valid) is None  # three shares, one of them bad
    assert secagg.recover(shares[:2], 3, valid) is None
    assert secagg.recover([b"junk", shares[0], shares[0], *shares[1:4]], 3, valid) == secret
    other = list(secagg.split_secret(bytes(32), ADDRESSES, 3).values())  # a client sharing another secret
    assert secagg.recover(other, 3, valid) is None


# --- sealed messages ----------------------------------------------------------------------------


def test_seal_round_trips_and_refuses_any_tampering():
    key = secagg.shared_key(fixed_key_pair(0).secret, fixed_key_pair(1).public, b"seal")
    share = secagg.split_secret(bytes(range(32)), ADDRESSES, 3)[ADDRESSES[2]]
    associated = b"round 7|from 0xab|to 0x4b"
    sealed = secagg.seal(key, share, associated)
    assert len(sealed) == 12 + len(share) + 16
    assert secagg.open_sealed(key, sealed, associated) == share
    assert secagg.seal(key, share, associated) != sealed  # a fresh nonce every time
    for position in (0, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[position] ^= 0x80
        with pytest.raises(ValueError, match="does not authenticate"):
            secagg.open_sealed(key, bytes(tampered), associated)
    with pytest.raises(ValueError, match="does not authenticate"):
        secagg.open_sealed(key, sealed, associated + b"x")
    with pytest.raises(ValueError, match="does not authenticate"):
        secagg.open_sealed(bytes(32), sealed, associated)
    with pytest.raises(ValueError, match="shorter than nonce and tag"):
        secagg.open_sealed(key, sealed[:27], associated)
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.open_sealed(key[:16], sealed, associated)
    assert secagg.open_sealed(key, secagg.seal(key, b"", b""), b"") == b""


# --- merging groups -----------------------------------------------------------------------------


def test_groups_merge_by_their_median_and_a_group_pointing_away_is_left_out():
    from processor.secure_sum import merge_groups

    rng = np.random.default_rng(5)
    direction = rng.normal(size=200).astype(np.float32)
    honest = [{"w": direction + rng.normal(scale=0.3, size=200).astype(np.float32)} for _ in range(3)]
    steering = {"w": -5 * direction}  # one hostile member's choice of its group's mean
    merged, left_out = merge_groups([(m, 5) for m in honest] + [(steering, 5)])
    assert left_out.keys() == {3} and "points away" in left_out[3]
    median = np.median(np.stack([m["w"] for m in honest]), axis=0)
    np.testing.assert_allclose(merged["w"], median, atol=np.linalg.norm(direction))
    assert np.dot(merged["w"], direction) > 0.8 * np.dot(direction, direction)
    # a group that is merely longer is clipped to the median norm, not refused
    long = {"w": 50 * honest[2]["w"]}
    merged, left_out = merge_groups([(honest[0], 5), (honest[1], 5), (long, 5)])
    norms = [np.linalg.norm(m["w"]) for m in (honest[0], honest[1], long)]
    clipped = long["w"] * (np.median(norms) / norms[2])
    assert not left_out
    np.testing.assert_allclose(merged["w"], np.median(np.stack([honest[0]["w"], honest[1]["w"], clipped]), axis=0),
                               rtol=1e-5)
    # one or two groups: their (weighted) mean, nothing to compare with
    merged, left_out = merge_groups([(honest[0], 2), (steering, 1)])
    np.testing.assert_allclose(merged["w"], (2 * honest[0]["w"] + steering["w"]) / 3, rtol=1e-5)
    assert not left_out


def test_a_copied_public_key_agrees_keys_unrelated_to_its_owners(clients):
    """A hostile client posting an honest one's mask key as its own: every pairwise key agreed with
    it (which the survivors reveal once it drops) differs from those agreed with the honest one."""
    honest, hostile, peer = ADDRESSES[0], ADDRESSES[1], ADDRESSES[2]
    copied = clients[honest].public
    with_hostile = secagg.pair_key(clients[peer].secret, peer, hostile, copied, CONTEXT)
    with_honest = secagg.pair_key(clients[peer].secret, peer, honest, copied, CONTEXT)
    assert with_hostile != with_honest
    assert with_honest == secagg.pair_key(clients[honest].secret, honest, peer, clients[peer].public, CONTEXT)
