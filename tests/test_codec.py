"""The safetensors codec: exact round trips, and a clear rejection of anything malformed."""
import json
import pickle
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from processor import codec
from processor.codec import CodecError
from processor.penalty import Curvature, RoundCurvature
from processor.tasks import get_task, interest_task
from processor.training import TrainingSettings

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
    encoded = codec.encode_model(TASK, weights, fisher, round_id=4, plan=TrainingSettings())
    table, _ = codec.read_header(encoded)
    assert {table[f"weights/{n}"].dtype for n in TASK.spec} == {"F32"}
    assert {table[f"fisher/{n}"].dtype for n in TASK.spec} == {"F16"}
    decoded_w, decoded_f, meta, _ = codec.decode_model(TASK, encoded)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded_w[name], weights[name])
        np.testing.assert_allclose(decoded_f[name], fisher[name], rtol=1e-3)
        assert decoded_f[name].dtype == np.float32
    assert meta["round"] == "4" and meta["kind"] == "base" and meta["arch"] == TASK.arch_id


def test_a_fisher_out_of_float16_range_is_published_as_float32():
    weights, fisher = random_weights(1), {n: np.abs(w) for n, w in random_weights(2).items()}
    next(iter(fisher.values())).flat[0] = 1e6
    encoded = codec.encode_model(TASK, weights, fisher, round_id=4, plan=TrainingSettings())
    assert {entry.dtype for entry in codec.read_header(encoded)[0].values()} == {"F32"}
    _, decoded_f, _, _ = codec.decode_model(TASK, encoded)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded_f[name], fisher[name])


def test_delta_round_trip_is_exact_and_carries_its_metadata():
    delta = random_weights(3)
    decoded, meta, _ = codec.decode_delta(TASK, encoded_delta(delta), expected_round=3, expected_base_cid=CID)
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded[name], delta[name])
    assert meta["client"] == CLIENT and meta["num_samples"] == "120"


def test_float16_delta_is_about_half_the_size_and_close():
    delta = random_weights(4, scale=0.01)
    small = encoded_delta(delta, dtype="float16")
    assert len(small) < 0.6 * len(encoded_delta(delta))
    decoded, _, _ = codec.decode_delta(TASK, small)
    for name in TASK.spec:
        np.testing.assert_allclose(decoded[name], delta[name], rtol=1e-3, atol=1e-6)
        assert decoded[name].dtype == np.float32


def test_a_float16_delta_out_of_its_range_is_published_as_float32():
    delta = random_weights(4, scale=0.01)
    name = next(iter(TASK.spec))
    delta[name].flat[0] = 1e5  # float16 tops out at 65504
    decoded, meta, _ = codec.decode_delta(TASK, encoded_delta(delta, dtype="float16"))
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
    (raw_delta(prefixed(random_weights()), num_samples="-5"), "metadata num_samples: string should match pattern"),
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
        codec.decode_delta(TASK, codec.encode_model(TASK, random_weights(), random_weights(), round_id=1,
                                                plan=TrainingSettings()))
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
        codec.decode_model(TASK, codec.encode_model(mnist, other, other, round_id=1,
                                                      plan=TrainingSettings()))


def header_bytes(header) -> bytes:
    """Safetensors bytes whose header is `header` (any JSON value), with no tensor data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body


BASE_HEADER = {"__metadata__": {"format": codec.FORMAT, "kind": "delta", "task": "digits", "arch": TASK.arch_id},
               "delta/output/bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}


@pytest.mark.parametrize("change, message", [
    ({"__metadata__": [1, 2]}, "metadata: input should be a valid dictionary"),
    ({"__metadata__": "text"}, "metadata: input should be a valid dictionary"),
    ({"__metadata__": {**BASE_HEADER["__metadata__"], "client": 5}}, "metadata client: input should be a valid string"),
    ({"__metadata__": {**BASE_HEADER["__metadata__"], "num_samples": [1]}}, "metadata num_samples: input should be"),
    ({"delta/output/bias": {"dtype": "F32", "shape": 10, "data_offsets": [0, 40]}},
     "tensor delta/output/bias.shape: input should be a valid list"),
    ({"delta/output/bias": {"dtype": "F32", "shape": [10], "data_offsets": "0-40"}},
     "tensor delta/output/bias.data_offsets: input should be a valid list"),
    ({"delta/output/bias": {"dtype": "F32", "shape": [10], "data_offsets": {"0": 40}}},
     "tensor delta/output/bias.data_offsets: input should be a valid list"),
    ({"delta/output/bias": {"dtype": "F32", "shape": [True], "data_offsets": [0, 40]}},
     "tensor delta/output/bias.shape.0: input should be a valid integer"),
    ({"delta/output/bias": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 40]}},
     "tensor delta/output/bias.shape.0: input should be less than or equal to"),
    ({"delta/output/bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40], "extra": 1}},
     "tensor delta/output/bias.extra: extra inputs are not permitted"),
    ({"delta/output/bias": [1, 2]}, "tensor delta/output/bias: input should be a valid dictionary"),
])
def test_header_fields_of_the_wrong_json_type_are_rejected_by_the_schema(change, message):
    with pytest.raises(CodecError, match=re.escape(message)):
        codec.decode_delta(TASK, header_bytes({**BASE_HEADER, **change}))


@pytest.mark.parametrize("value, message", [
    (b"1e400", "not JSON"),  # no infinite float sneaks through
    (b"[" * 100_000 + b"]" * 100_000, "depth limit exceeded"),  # refused, not a stack overflow
    (b'{"a": ' * 2_000 + b"1" + b"}" * 2_000, "depth limit exceeded"),
])
def test_hostile_header_json_is_refused_without_recursion(value, message):
    with pytest.raises(CodecError, match=message):
        codec.read_header(header_bytes(value))


def test_delta_metadata_fields_are_checked_by_the_schema():
    for field, value, message in [("client", "not an address", "metadata client: string should match pattern"),
                                  ("round", "1e400", "metadata round: string should match pattern"),
                                  ("num_samples", "1e400", "metadata num_samples: string should match pattern"),
                                  ("num_samples", "9" * 30, "metadata num_samples: string should match pattern")]:
        with pytest.raises(CodecError, match=message):
            codec.decode_delta(TASK, raw_delta(prefixed(random_weights()), **{field: value}))
    metadata = {k: v for k, v in codec.read_header(encoded_delta())[1].items() if k != "client"}
    with pytest.raises(CodecError, match="metadata client: field required"):
        codec.decode_delta(TASK, save(prefixed(random_weights()), metadata=metadata))


def test_nesting_at_the_header_size_cap_is_refused_and_past_it_the_header_is_not_read():
    with pytest.raises(CodecError, match="depth limit exceeded"):
        codec.read_header(header_bytes(b"[" * codec.MAX_HEADER_BYTES))
    with pytest.raises(CodecError, match=f"header of {codec.MAX_HEADER_BYTES + 1} bytes"):
        codec.read_header(header_bytes(b"[" * (codec.MAX_HEADER_BYTES + 1)))


def test_a_base_model_carries_the_rounds_training_plan():
    plan = TrainingSettings(epochs=3, batch_size=16, learning_rate=0.2, ewc_lambda=50.0, update_dtype="float32")
    fisher = {n: np.abs(w) for n, w in random_weights(2).items()}
    _, _, metadata, _ = codec.decode_model(TASK, codec.encode_model(TASK, random_weights(), fisher, 2, plan))
    assert codec.training_plan(metadata) == plan


@pytest.mark.parametrize("plan, message", [
    (None, "carries no training plan"),
    ("[1]", "not a JSON object"),
    ('{"epochs": 1}', "has the fields"),
    ('{"epochs": "1", "batch_size": 32, "learning_rate": 0.05, "ewc_lambda": 0, "regularizer": "ewc", '
     '"update_dtype": "float16"}',
     "epochs is '1', not a int"),
    ('{"epochs": 0, "batch_size": 32, "learning_rate": 0.05, "ewc_lambda": 0, "regularizer": "ewc", '
     '"update_dtype": "float16"}',
     "must be at least 1"),
    ('{"epochs": 1, "batch_size": 32, "learning_rate": 0.05, "ewc_lambda": 0, "regularizer": "ewc", '
     '"update_dtype": "int4"}',
     "unsupported update dtype"),
])
def test_a_plan_that_does_not_fit_its_schema_is_refused(plan, message):
    metadata = {} if plan is None else {"plan": plan}
    with pytest.raises(CodecError, match=message):
        codec.training_plan(metadata)


def test_a_recommenders_files_hold_its_global_tensors_and_a_private_one_is_refused():
    interest = get_task("interest")
    assert set(interest.private_spec) == {"user_factors/embeddings", "user_bias/embeddings"}
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(size=s).astype(np.float32) for n, s in interest.spec.items()}
    fields = dict(round_id=3, base_cid=CID, num_samples=120, client=CLIENT)
    encoded = codec.encode_delta(interest, delta, **fields)
    assert set(codec.read_header(encoded)[0]) == {f"delta/{n}" for n in interest.spec}
    decoded, _, _ = codec.decode_delta(interest, encoded)
    assert all(np.array_equal(decoded[n], delta[n]) for n in interest.spec)
    model = codec.encode_model(interest, delta, delta, round_id=1, plan=TrainingSettings())
    assert not any("user_" in name for name in codec.read_header(model)[0])

    # a delta that also carries the user state, as a careless or curious client might publish it
    leaking = {f"delta/{n}": t for n, t in delta.items()}
    leaking.update({f"delta/{n}": np.zeros(s, np.float32) for n, s in interest.private_spec.items()})
    metadata = {"format": codec.FORMAT, "kind": "delta", "task": "interest", "arch": interest.arch_id,
                "round": "3", "base_cid": CID, "num_samples": "120", "client": CLIENT, "dtype": "float32"}
    with pytest.raises(CodecError, match=r"private tensor\(s\) delta/user_bias/embeddings, "
                                         r"delta/user_factors/embeddings: a device's user state never leaves it"):
        codec.decode_delta(interest, save(leaking, metadata=metadata))


def test_a_devices_private_file_round_trips_and_fits_only_its_own_model():
    interest = get_task("interest")
    rng = np.random.default_rng(1)
    private = {n: rng.normal(size=s).astype(np.float32) for n, s in interest.private_spec.items()}
    decoded = codec.decode_private(interest, codec.encode_private(interest, private))
    assert all(np.array_equal(decoded[n], private[n]) for n in interest.private_spec)
    smaller = interest_task(interest.data, factors=8)
    with pytest.raises(CodecError, match="metadata arch is 'rec-44-1683-16-u1024', expected 'rec-44-1683-8-u1024'"):
        codec.decode_private(smaller, codec.encode_private(interest, private))


def fisher_of(seed: int) -> dict:
    return {n: np.abs(w) for n, w in random_weights(seed).items()}


def test_a_fedcurv_update_carries_its_fisher_and_is_refused_without_it_or_with_it_unasked():
    fisher = fisher_of(4)
    with_fisher = encoded_delta(fisher=fisher, dtype="float16")
    delta, meta, decoded = codec.decode_delta(TASK, with_fisher, with_fisher=True)
    for name in fisher:
        np.testing.assert_allclose(decoded[name], fisher[name].astype(np.float16).astype(np.float32))
    with pytest.raises(CodecError, match="unknown tensor.*fisher/"):  # a plain round's update has none
        codec.decode_delta(TASK, with_fisher)
    with pytest.raises(CodecError, match="missing tensor.*fisher/"):
        codec.decode_delta(TASK, encoded_delta(), with_fisher=True)
    negative = {**fisher, "output/bias": -fisher["output/bias"] - 1.0}
    with pytest.raises(CodecError, match="the update's Fisher holds negative values"):
        codec.decode_delta(TASK, encoded_delta(fisher=negative), with_fisher=True)
    beyond = {**fisher, "output/bias": np.full_like(fisher["output/bias"], 1e6)}  # past float16's range
    _, _, kept = codec.decode_delta(TASK, encoded_delta(fisher=beyond, dtype="float16"), with_fisher=True)
    assert kept["output/bias"][0] == 1e6


def published_curvature(scales: dict[str, float], round_id: int = 3) -> RoundCurvature:
    return RoundCurvature(Curvature(fisher_of(5), random_weights(6)), round_id, scales)


def test_a_base_carries_the_last_rounds_fedcurv_statistics_and_the_clients_they_sum():
    scales = {CLIENT.lower(): 1.0, "0x" + "ab" * 20: 0.123456789012345}
    curvature = published_curvature(scales)
    encoded = codec.encode_model(TASK, random_weights(1), fisher_of(2), round_id=4, plan=TrainingSettings(),
                                 curvature=curvature)
    decoded = codec.decode_model(TASK, encoded).curvature
    assert decoded.round_id == 3 and decoded.scales == scales  # every factor exactly as merged
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded.total.fisher[name], curvature.total.fisher[name])
        np.testing.assert_array_equal(decoded.total.pull[name], curvature.total.pull[name])
    plain = codec.encode_model(TASK, random_weights(1), fisher_of(2), round_id=4, plan=TrainingSettings())
    assert codec.decode_model(TASK, plain).curvature is None
    # a round's list of clients is as long as the round: far past every other metadata value's bound
    many = {f"0x{k:040x}": 1.0 for k in range(1, 1001)}
    assert codec.decode_model(TASK, codec.encode_model(TASK, random_weights(1), fisher_of(2), 4, TrainingSettings(),
                                                       curvature=published_curvature(many))).curvature.scales == many


@pytest.mark.parametrize("clients, complaint", [
    (f"{CLIENT}:1.5", "factor '1.5', not in"),
    (f"{CLIENT}:0", "factor '0', not in"),
    (f"{CLIENT}:9e999", "factor '9e999', not in"),
    (f"{CLIENT}:nan", "metadata curvature_clients: string should match pattern"),
    (f"{CLIENT}:1.0,{CLIENT.upper().replace('0X', '0x')}:1.0", "names .* twice"),
    (f"{CLIENT}=1.0", "metadata curvature_clients: string should match pattern"),
    ("", "metadata curvature_clients: string should match pattern"),
    (f"{CLIENT}:1.0," * 3000 + f"{CLIENT}:1.0", "at most 131072 characters"),
])
def test_a_base_whose_list_of_fedcurv_clients_does_not_fit_is_refused(clients, complaint):
    encoded = codec.encode_model(TASK, random_weights(1), fisher_of(2), round_id=4, plan=TrainingSettings(),
                                 curvature=published_curvature({CLIENT.lower(): 1.0}))
    table, metadata = codec.read_header(encoded)
    tensors = {name: np.array(t) for name, t in codec._tensor_views(encoded, struct.unpack("<Q", encoded[:8])[0],
                                                                   table).items()}
    with pytest.raises(CodecError, match=complaint):
        codec.decode_model(TASK, save(tensors, metadata={**metadata, "curvature_clients": clients}))


def test_a_base_with_fedcurv_statistics_missing_or_negative_is_refused():
    encoded = codec.encode_model(TASK, random_weights(1), fisher_of(2), round_id=4, plan=TrainingSettings(),
                                 curvature=published_curvature({CLIENT.lower(): 1.0}))
    table, metadata = codec.read_header(encoded)
    tensors = {name: np.array(t) for name, t in codec._tensor_views(encoded, struct.unpack("<Q", encoded[:8])[0],
                                                                   table).items()}
    without_pull = {n: t for n, t in tensors.items() if not n.startswith("curvature_pull/")}
    with pytest.raises(CodecError, match="missing tensor.*curvature_pull/"):
        codec.decode_model(TASK, save(without_pull, metadata=metadata))
    negative = {**tensors, "curvature_fisher/output/bias": -np.ones_like(tensors["curvature_fisher/output/bias"])}
    with pytest.raises(CodecError, match="the FedCurv statistics' Fisher holds negative values"):
        codec.decode_model(TASK, save(negative, metadata=metadata))
