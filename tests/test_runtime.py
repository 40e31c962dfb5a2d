"""Helpers that the services share (runtime, services)."""
from __future__ import annotations

import threading
import time

from runtime import fetched_ahead
from services import machine_busy_seconds


def test_fetched_ahead_keeps_the_order_and_overlaps_a_bounded_number_of_fetches():
    running, most_running = 0, 0
    guard = threading.Lock()

    def fetch(item: int) -> int:
        nonlocal running, most_running
        with guard:
            running += 1
            most_running = max(most_running, running)
        time.sleep(0.05 if item % 2 else 0.01)  # later items may finish first
        with guard:
            running -= 1
        return item * item

    results = []
    for item, future in fetched_ahead(range(12), fetch, ahead=3):
        results.append((item, future.result()))
    assert results == [(i, i * i) for i in range(12)]
    assert most_running == 3  # three waits overlapped, never more


def test_fetched_ahead_hands_a_failure_to_its_item_only():
    def fetch(item: int) -> int:
        if item == 2:
            raise ValueError("item 2 is bad")
        return item

    outcomes = []
    for item, future in fetched_ahead(range(5), fetch, ahead=2):
        try:
            outcomes.append(future.result())
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes == [0, 1, "item 2 is bad", 3, 4]


def test_fetched_ahead_stops_fetching_when_the_consumer_stops():
    fetched = []
    for item, future in fetched_ahead(range(100), fetched.append, ahead=2):
        if item == 3:
            break
    assert len(fetched) <= 6


def test_machine_busy_seconds_counts_at_least_this_process_busy_time():
    machine, process = machine_busy_seconds(), time.process_time()
    while time.process_time() - process < 0.3:  # keep one core busy for 0.3 CPU-seconds
        sum(range(1000))
    # the kernel counts in ticks (10 ms); everything else running only adds to the machine's figure
    assert machine_busy_seconds() - machine >= time.process_time() - process - 0.05
