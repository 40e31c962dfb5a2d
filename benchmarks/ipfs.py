"""Add and get throughput of the IPFS daemon and of the embedded store, for 1, 10 and 50 MB.

    python -m benchmarks.ipfs [--json] [--api-port 5121] [--repeats 3]

Starts js-ipfs on a non-default port in a temporary repo (or reuses a daemon already answering
there), and measures through ipfs.IPFSStore and ipfs.EmbeddedStore, so the figures include
what the apps pay: the HTTP transfer and the CID verification of every get. Progress goes to
stderr; with --json the last stdout line is
{"daemon": {"1": {"add_MBps", "get_MBps"}, "10": ..., "50": ...}, "embedded": {same}}.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.measure import best_seconds, log, record_result
from infra import ipfs

SIZES_MB = (1, 10, 50)
MB = 1_000_000


def measure(store: ipfs.ContentStore, repeats: int) -> dict[str, dict[str, float]]:
    results = {}
    for size_mb in SIZES_MB:
        # Fresh random bytes per repeat, so that no add finds its blocks already stored.
        payloads = iter([os.urandom(size_mb * MB) for _ in range(repeats)])
        add_s = best_seconds(lambda: store.add(next(payloads)), repeats)
        cid = store.add(data := os.urandom(size_mb * MB))
        get_s = best_seconds(lambda: store.get(cid), repeats)
        assert store.get(cid) == data
        results[str(size_mb)] = {"add_MBps": round(size_mb / add_s, 1), "get_MBps": round(size_mb / get_s, 1)}
        log(f"  {size_mb:>3} MB: add {results[str(size_mb)]['add_MBps']:>7} MB/s, "
            f"get {results[str(size_mb)]['get_MBps']:>7} MB/s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    parser.add_argument("--api-port", type=int, default=5121, help="API port of the benchmark daemon")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ipfs-bench-") as tmp:
        tmp = Path(tmp)
        api = f"http://127.0.0.1:{args.api_port}"
        with ipfs.IPFSDaemon.for_api(api, repo_dir=tmp / "repo", log_path=tmp / "ipfs.log") as daemon:
            store = ipfs.IPFSStore(api, timeout=120)
            log(f"{store.describe()} ({'reused' if daemon.reused else 'started for this run'})")
            results = {"daemon": measure(store, args.repeats)}
        embedded = ipfs.EmbeddedStore(tmp / "store")
        log(embedded.describe())
        results["embedded"] = measure(embedded, args.repeats)

    record_result(results)
    if args.json:
        print(json.dumps(results))
    else:
        for backend, figures in results.items():
            for size, rates in figures.items():
                print(f"{backend:>8} {size:>3} MB  add {rates['add_MBps']:>7} MB/s  get {rates['get_MBps']:>7} MB/s")


if __name__ == "__main__":
    main()
