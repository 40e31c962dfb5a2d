"""FedAvg of N client deltas held as safetensors bytes, against one plain pass over the same bytes.

    python -m benchmarks.aggregate [--json] [--sizes 10 100 1000] [--repeats 3]

The model is an MLP 784-1024-200-10 (1,010,850 float32 parameters, a 4 MB delta). The
aggregation is what the organization runs per accepted update: codec.decode_delta (header,
names, shapes, dtype and finiteness checks) then the streaming aggregate.weighted_mean. The
baseline is the least any FedAvg must do: view each delta's tensor bytes as float32 and add them
into one buffer. bandwidth_fraction = baseline seconds / aggregation seconds (1.0 = as fast as
the plain pass). peak_mb is tracemalloc's peak during the aggregation (a separate run, since
tracing slows allocation), excluding the input bytes. The N deltas cycle through 10 distinct
encoded ones so the input fits in memory at N = 1000. Progress goes to stderr; with --json the
last stdout line is {"10": {"seconds", "bandwidth_fraction", "peak_mb", "baseline_seconds"}, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import tracemalloc
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks.measure import best_seconds, log, record_result
from processor import aggregate as agg
from processor import codec
from processor.tasks import Task

DISTINCT = 10


def bench_task() -> Task:
    return Task("bench", lambda: None, 784, (1024, 200), 10)


def encoded_deltas(task: Task, count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [codec.encode_delta(task, {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in task.spec.items()},
                               round_id=1, base_cid="bafy-bench", num_samples=int(rng.integers(50, 500)),
                               client=f"0x{k:040x}")
            for k in range(count)]


def stream(pool: list[bytes], n: int) -> Iterator[bytes]:
    return (pool[i % len(pool)] for i in range(n))


def fedavg(task: Task, blobs: Iterator[bytes]) -> agg.Weights:
    def decoded():
        for data in blobs:
            delta, metadata, _ = codec.decode_delta(task, data, expected_round=1, expected_base_cid="bafy-bench")
            yield delta, int(metadata["num_samples"])
    return agg.weighted_mean(decoded())


def plain_pass(blobs: Iterator[bytes]) -> np.ndarray:
    """Every tensor byte read once, as float32, added into one buffer."""
    total = None
    for data in blobs:
        header_size = int.from_bytes(data[:8], "little")
        view = np.frombuffer(data, np.float32, offset=8 + header_size)
        if total is None:
            total = np.zeros_like(view)
        np.add(total, view, out=total)
    return total


def peak_mb(action) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    action()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    task = bench_task()
    params = sum(int(np.prod(s)) for s in task.spec.values())
    pool = encoded_deltas(task, DISTINCT)
    log(f"model: {params:,} parameters, delta {len(pool[0]) / 1e6:.2f} MB as float32 safetensors")
    figures = {}
    for n in args.sizes:
        repeats = args.repeats if n < 1000 else 1
        seconds = best_seconds(lambda: fedavg(task, stream(pool, n)), repeats)
        baseline = best_seconds(lambda: plain_pass(stream(pool, n)), repeats)
        peak = peak_mb(lambda: fedavg(task, stream(pool, n)))
        figures[str(n)] = {"seconds": round(seconds, 4), "bandwidth_fraction": round(baseline / seconds, 3),
                           "peak_mb": round(peak, 1), "baseline_seconds": round(baseline, 4)}
        log(f"N={n:>5}: fedavg {seconds:.3f} s ({n * len(pool[0]) / 1e9 / seconds:.2f} GB/s), plain pass "
            f"{baseline:.3f} s, fraction {baseline / seconds:.2f}, peak {peak:.1f} MB")
    record_result(figures)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
