"""What the benchmarks share: progress on stderr (stdout's last line is the JSON) and timing."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(result: dict, json_only: bool) -> dict:
    """Print `result`: a line per figure (unless `json_only`), then the JSON line last."""
    if not json_only:
        for name, value in result.items():
            print(f"{name}: {value}")
    print(json.dumps(result))
    return result


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)
