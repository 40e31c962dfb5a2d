"""Helpers that the services share (runtime, services)."""
from __future__ import annotations

import time

from infra.processes import machine_busy_seconds


def test_machine_busy_seconds_counts_at_least_this_process_busy_time():
    machine, process = machine_busy_seconds(), time.process_time()
    while time.process_time() - process < 0.3:  # keep one core busy for 0.3 CPU-seconds
        sum(range(1000))
    # the kernel counts in ticks (10 ms); everything else running only adds to the machine's figure
    assert machine_busy_seconds() - machine >= time.process_time() - process - 0.05
