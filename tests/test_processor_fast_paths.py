"""The zero-copy decoder and the float32 streaming FedAvg: same answers, same rejections."""
import json
import struct

import numpy as np
import pytest

from processor import aggregate as agg
from processor import codec
from processor.codec import CodecError
from processor.tasks import get_task

TASK = get_task("digits")
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


def weights(seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in TASK.spec.items()}


def encoded(delta, dtype="float32"):
    return codec.encode_delta(TASK, delta, round_id=1, base_cid=CID, num_samples=10, client="0x" + "1" * 40,
                              dtype=dtype)


def with_header(data: bytes, edit) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def test_decoded_float32_tensors_are_read_only_views_equal_to_the_input():
    delta = weights()
    decoded, _, _ = codec.decode_delta(TASK, encoded(delta))
    for name in TASK.spec:
        np.testing.assert_array_equal(decoded[name], delta[name])
        assert not decoded[name].flags.writeable


def test_overlapping_or_short_offsets_are_rejected():
    data = encoded(weights())
    first = next(iter(TASK.spec))

    def overlap(header):
        begin, end = header[f"delta/{first}"]["data_offsets"]
        header[f"delta/{first}"]["data_offsets"] = [begin + 4, end + 4]

    with pytest.raises(CodecError, match="corrupt"):
        codec.decode_delta(TASK, with_header(data, overlap))
    with pytest.raises(CodecError, match="corrupt"):
        codec.decode_delta(TASK, data + b"\0" * 8)  # trailing bytes no tensor owns


def test_huge_finite_values_pass_and_nan_fails_in_either_dtype():
    delta = weights()
    name = next(iter(TASK.spec))
    delta[name].flat[0] = 1e30  # its square overflows float32: the exact check must decide
    codec.decode_delta(TASK, encoded(delta))
    for dtype in ("float32", "float16"):
        bad = weights()
        bad[name].flat[3] = np.nan
        with pytest.raises(CodecError, match="non-finite"):
            codec.decode_delta(TASK, encoded(bad, dtype))


def test_float32_fedavg_matches_a_float64_mean_of_a_thousand_deltas():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(200,)).astype(np.float32)
    deltas = [({"w": base + rng.normal(size=(200,)).astype(np.float32)}, int(n)) for n in rng.integers(1, 500, 1000)]
    counts = np.array([n for _, n in deltas], np.float64)
    direct = np.tensordot(counts / counts.sum(), np.stack([d["w"] for d, _ in deltas]).astype(np.float64), axes=1)
    merged = agg.weighted_mean(deltas)
    assert merged["w"].dtype == np.float32
    np.testing.assert_allclose(merged["w"], direct, rtol=1e-5, atol=1e-5)
