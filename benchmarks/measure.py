"""What the benchmarks share: progress on stderr (stdout's last line is the JSON), timing, and
runs of the full stack."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stack_settings(folder: Path, **settings):
    """Settings for a new chain node and IPFS daemon on free ports, their state under `folder`."""
    from demo import free_port
    from infra.settings import Settings

    return Settings.from_env(state_dir=folder, chain_url=f"http://127.0.0.1:{free_port(0)}",
                             ipfs_api=f"http://127.0.0.1:{free_port(0)}", **settings)


RESULTS_DIR = Path(__file__).resolve().parent / "results"  # a JSON-lines file per benchmark, kept in git


def report(result: dict, json_only: bool) -> dict:
    """Print `result`: a line per figure (unless `json_only`), then the JSON line last; and record
    it in the benchmark's results file."""
    if not json_only:
        for name, value in result.items():
            print(f"{name}: {value}")
    print(json.dumps(result))
    record_result(result)
    return result


def record_result(result: dict) -> Path:
    """Append `result` to RESULTS_DIR/<benchmark>.jsonl, with when, at which commit and with which
    arguments it was measured; the benchmark is the module run with `python -m benchmarks.<name>`."""
    from infra.files import append_json_line

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name.rsplit(".", 1)[-1] if spec is not None else Path(sys.argv[0]).stem
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS_DIR.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a checkout
        commit = None
    path = RESULTS_DIR / f"{name}.jsonl"
    append_json_line(path, {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
                            "args": sys.argv[1:], "result": result})
    return path


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def free_ports(first: int, count: int) -> int:
    """The first of `count` consecutive free ports, from `first` on."""
    from infra.processes import port_listens

    port = first
    while any(port_listens(p) for p in range(port, port + count)):
        port += count
    return port


def full_stack_run(options, label: str, chain_url: str | None = None, ipfs_api: str | None = None,
                   state_dir: Path | None = None) -> dict:
    """`demo.run_demo(options)` on a chain and an IPFS daemon of the run's own (free ports, never
    8545 / 5001, a fresh state dir, removed unless the run failed: its logs), its apps on free
    ports from 5640; the demo's table goes to stderr, so stdout keeps the JSON line. Its report."""
    from demo import free_port, run_demo
    from infra.settings import Settings

    options = replace(options, org_port=free_port(5640), first_client_port=free_ports(5650, options.clients))
    chain_url = chain_url or f"http://127.0.0.1:{free_port(8945)}"
    ipfs_api = ipfs_api or f"http://127.0.0.1:{free_port(5401)}"
    own_dir = state_dir is None
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix=f"fl-bench-{label}-"))
    stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        report = run_demo(options, Settings.from_env(chain_url=chain_url, ipfs_api=ipfs_api, state_dir=state_dir))
    finally:
        sys.stdout = stdout
    if own_dir:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report
