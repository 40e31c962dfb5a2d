"""What the benchmarks share: progress on stderr (stdout's last line is the JSON) and timing."""
from __future__ import annotations

import sys
import time
from typing import Callable


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)
