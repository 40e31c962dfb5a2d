"""The safetensors codec: exact round trips, and a clear rejection of anything malformed."""
import pickle
import struct
import json

import numpy as np
import pytest
from safetensors.numpy import save

from processor import codec
from processor.codec import CodecError
from processor.tasks import get_task

TASK = get_task("digits")
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
CLIENT = "0x1234567890AbcdEF1234567890aBcdef12345678"


def random_weights(seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in TASK.spec.items()}


def encoded_delta(delta=None, **overrides):
    fields = dict(round_id=3, base_cid=CID, num_samples=120, client=CLIENT)
    fields.update(overrides)
    return codec.encode_delta(TASK, delta if delta is not None else random_weights(), **fields)


def raw_delta(tensors, **meta):
    metadata = {"format": codec.FORMAT, "kind": "delta", "task": "digits", "arch": TASK.arch_id, "round": "3",
                "base_cid": CID, "num_samples": "120", "client": CLIENT, "dtype": "float32", **meta}
    return save(tensors, metadata=metadata)


def test_model_round_trip_keeps_the_weights_exact_and_the_fisher_in_float16():
    weights, fisher = random_weights(1), {n: np.abs(w) for n, w in random_weights(2).items()}
    encoded = codec.encode_model(TASK, weights, fisher, round_id=4)
    table, _ = codec.read_header(encoded)
    assert {table[f"weights/{n}"]["dtype"] for n in TASK.spec} == {"F32"}
    assert {table[f"fisher/{n}"]["dtype"] for n in TASK.spec} == {"F16"}
    decoded_w, decoded_f, meta = codec.decode_model(TASK, encoded)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded_w[name], weights[name])
        np.testing.assert_allclose(decoded_f[name], fisher[name], rtol=1e-3)
        assert decoded_f[name].dtype == np.float32
    assert meta["round"] == "4" and meta["kind"] == "base" and meta["arch"] == TASK.arch_id


def test_a_fisher_out_of_float16_range_is_published_as_float32():
    weights, fisher = random_weights(1), {n: np.abs(w) for n, w in random_weights(2).items()}
    next(iter(fisher.values())).flat[0] = 1e6
    encoded = codec.encode_model(TASK, weights, fisher, round_id=4)
    assert {entry["dtype"] for name, entry in codec.read_header(encoded)[0].items()} == {"F32"}
    _, decoded_f, _ = codec.decode_model(TASK, encoded)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded_f[name], fisher[name])


def test_delta_round_trip_is_exact_and_carries_its_metadata():
    delta = random_weights(3)
    decoded, meta = codec.decode_delta(TASK, encoded_delta(delta), expected_round=3, expected_base_cid=CID)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded[name], delta[name])
    assert meta["client"] == CLIENT and meta["num_samples"] == "120"


def test_float16_delta_is_about_half_the_size_and_close():
    delta = random_weights(4, scale=0.01)
    small = encoded_delta(delta, dtype="float16")
    assert len(small) < 0.6 * len(encoded_delta(delta))
    decoded, _ = codec.decode_delta(TASK, small)
    for name in TASK.spec:
        np.testing.assert_allclose(decoded[name], delta[name], rtol=1e-3, atol=1e-6)
        assert decoded[name].dtype == np.float32


def test_a_float16_delta_out_of_its_range_is_published_as_float32():
    delta = random_weights(4, scale=0.01)
    name = next(iter(TASK.spec))
    delta[name].flat[0] = 1e5  # float16 tops out at 65504
    decoded, meta = codec.decode_delta(TASK, encoded_delta(delta, dtype="float16"))
    assert meta["dtype"] == "float32"
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded[name], delta[name])


def prefixed(weights):
    return {f"delta/{n}": t for n, t in weights.items()}


def with_value(value):
    tensors = prefixed(random_weights())
    tensors["delta/output/bias"][3] = value
    return raw_delta(tensors)


@pytest.mark.parametrize("data, message", [
    (with_value(np.nan), "delta/output/bias holds non-finite values"),
    (with_value(np.inf), "delta/output/bias holds non-finite values"),
    (raw_delta({**prefixed(random_weights()), "delta/output/bias": np.zeros(11, np.float32)}),
     r"delta/output/bias has shape \(11,\), expected \(10,\)"),
    (raw_delta({**prefixed(random_weights()), "delta/output/bias": np.zeros(10, np.float64)}),
     "delta/output/bias has dtype F64"),
    (raw_delta({**prefixed(random_weights()), "delta/extra": np.zeros(1, np.float32)}),
     r"unknown tensor\(s\): delta/extra"),
    (raw_delta({k: v for k, v in prefixed(random_weights()).items() if k != "delta/hidden_0/bias"}),
     r"missing tensor\(s\): delta/hidden_0/bias"),
    (raw_delta(prefixed(random_weights()), arch="mlp-64-999-10"), "metadata arch is 'mlp-64-999-10'"),
    (raw_delta(prefixed(random_weights()), num_samples="-5"), "num_samples is '-5'"),
    (encoded_delta()[:-7], "corrupt safetensors file"),
    (encoded_delta()[:40], "truncated"),
    (b"", "shorter than its header"),
    (b"\x00" * 8 + b"garbage", "header is not JSON"),
    (pickle.dumps({"delta/output/bias": np.zeros(10)}), "not a safetensors file"),
])
def test_malformed_deltas_are_rejected_with_the_reason(data, message):
    with pytest.raises(CodecError, match=message):
        codec.decode_delta(TASK, data)


def test_header_json_that_is_not_an_object_is_rejected():
    body = json.dumps([1, 2]).encode()
    with pytest.raises(CodecError, match="not a JSON object"):
        codec.decode_delta(TASK, struct.pack("<Q", len(body)) + body)


def test_a_delta_for_another_round_or_base_is_rejected():
    with pytest.raises(CodecError, match="for round 3, expected round 4"):
        codec.decode_delta(TASK, encoded_delta(), expected_round=4)
    with pytest.raises(CodecError, match="trained from base"):
        codec.decode_delta(TASK, encoded_delta(), expected_base_cid="bafkreisomethingelse")


def test_a_model_is_not_accepted_as_a_delta_nor_a_delta_as_a_model():
    with pytest.raises(CodecError, match="metadata kind is 'base', expected 'delta'"):
        codec.decode_delta(TASK, codec.encode_model(TASK, random_weights(), random_weights(), round_id=1))
    with pytest.raises(CodecError, match="metadata kind is 'delta', expected 'base'"):
        codec.decode_model(TASK, encoded_delta())


def test_a_model_with_float16_weights_is_rejected():
    weights = {f"weights/{n}": w.astype(np.float16) for n, w in random_weights().items()}
    fisher = {f"fisher/{n}": w.astype(np.float16) for n, w in random_weights().items()}
    metadata = {"format": codec.FORMAT, "kind": "base", "task": "digits", "arch": TASK.arch_id, "round": "1"}
    with pytest.raises(CodecError, match="weights/.* has dtype F16, expected F32$"):
        codec.decode_model(TASK, save({**weights, **fisher}, metadata=metadata))


def test_a_model_for_another_task_is_rejected():
    mnist = get_task("mnist")
    other = {n: np.zeros(s, np.float32) for n, s in mnist.spec.items()}
    with pytest.raises(CodecError, match="metadata task is 'mnist', expected 'digits'"):
        codec.decode_model(TASK, codec.encode_model(mnist, other, other, round_id=1))


def test_validate_delta_bounds_the_norm():
    delta = random_weights(5)
    codec.validate_delta(TASK, delta, max_norm=1e3)
    with pytest.raises(CodecError, match="exceeds the bound"):
        codec.validate_delta(TASK, {n: t * 1e6 for n, t in delta.items()}, max_norm=1e3)
