"""The self-running network against the HTTP-driven way, on the full stack (Ganache, the IPFS
daemon, the organization and the clients as separate processes), mnist, 5 clients.

Each run on a new Ganache and IPFS daemon on free ports:
- self_running: the organization runs the rounds (--rounds) and the clients take part by
  themselves; the benchmark only reads the chain and the processes' records. Per round: seconds
  from its opening to the next round's opening, and test accuracy. Discovery latency: per round,
  from the organization sending the transaction that opens it (its clock) to the first client
  noticing it (that client's activity log), median over rounds.
- http_driven: the clients and the organization wait to be told, and every round is driven
  through their HTTP APIs (run.py demo --drive): the way rounds ran before.
  The two take turns, REPEATS runs of each (self-running first), so that a shared machine's
  slower and faster minutes fall on both; seconds_per_round lists every run's rounds in order.
- restart_run: self-running, and as every round opens client 0 is killed (SIGKILL, mid-pull or
  mid-training) and started again. Every round must close by its deadline, with no client
  submitting twice to a round, and no HTTP request from here to any app.

Progress goes to stderr; the last line on stdout is one JSON object:
    {"self_running": {"seconds_per_round": [...], "accuracy_per_round": [...]},
     "http_driven": {"seconds_per_round": [...]}, "discovery_latency_s": median,
     "restart_run": {"rounds": n, "closed_by_deadline": n, "double_submissions": 0, "http_calls_to_apps": 0}}

    python -m benchmarks.network --json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import requests

import demo
from benchmarks.measure import log, report, stack_settings
from infra.settings import Settings
from processor.training import TrainingSettings

CLIENTS = 5
ROUNDS = 10
REPEATS = 2  # runs of each way, taking turns
RESTART_ROUNDS = 6
ROUND_SECONDS = 60  # each round's deadline; the restart run's is RESTART_ROUND_SECONDS
RESTART_ROUND_SECONDS = 30
# A round closes by its deadline when the block that closed it is no later than this past it: the
# organization acts once the next block is surely past it (block times are whole seconds).
CLOSE_MARGIN_SECONDS = 3


def settings_for(folder: Path) -> Settings:
    return stack_settings(folder)


def options(rounds: int, round_seconds: int, **changes) -> demo.DemoOptions:
    return demo.DemoOptions(task="mnist", clients=CLIENTS, rounds=rounds, training=TrainingSettings(),
                            round_seconds=round_seconds, straggler=False, late_joiner=False,
                            org_port=demo.free_port(0), first_client_port=demo.free_port(0), **changes)


def discovery_latencies(system: demo.FullStack, rounds: int) -> list[float]:
    """Per round, seconds from the organization sending the transaction that opened it (its mining
    included) to the first client that noticed it."""
    history = system.history()
    opened = {1: history["first_opening_sent_at"]}
    opened.update({int(r) + 1: entry["next_opening_sent_at"] for r, entry in history["rounds"].items()})
    noticed: dict[int, float] = {}
    for k in system.clients:
        for event in system.activity(k):
            if event["event"] == "noticed":
                noticed[event["round"]] = min(noticed.get(event["round"], float("inf")), event["time"])
    return [noticed[r] - opened[r] for r in range(1, rounds + 1) if r in noticed and r in opened]


def self_running(folder: Path) -> tuple[dict, list[float]]:
    with ExitStack() as stack:
        rows, _, _, system = demo.run_self_running(options(ROUNDS, ROUND_SECONDS), settings_for(folder), stack)
        latencies = discovery_latencies(system, ROUNDS)
    log(f"self-running: {[row['seconds'] for row in rows]} s per round; discovery latencies "
        f"{[round(latency, 3) for latency in latencies]} s")
    return ({"seconds_per_round": [row["seconds"] for row in rows],
             "accuracy_per_round": [row["accuracy"] for row in rows]}, latencies)


def http_driven(folder: Path) -> dict:
    run_options = options(ROUNDS, ROUND_SECONDS, drive=True)
    with ExitStack() as stack:
        org, clients = demo.start_driven_stack(run_options, settings_for(folder), stack)
        rows, _ = demo.drive_rounds(org, clients, run_options)
    log(f"HTTP-driven: {[row['seconds'] for row in rows]} s per round")
    return {"seconds_per_round": [row["seconds"] for row in rows],
            "accuracy_per_round": [row["accuracy"] for row in rows]}


def restart_run(folder: Path) -> dict:
    app_calls = []
    request = requests.Session.request

    def counted(session, method, url, *args, **kwargs):
        if urlsplit(url).port in app_ports:
            app_calls.append(url)
        return request(session, method, url, *args, **kwargs)

    def kill_and_restart(system: demo.FullStack, row: dict) -> None:
        log(f"round {row['round'] + 1} is open: killing client 0 and starting it again")
        system.clients[0].kill()
        system.clients[0].start()

    run_options = options(RESTART_ROUNDS, RESTART_ROUND_SECONDS)
    app_ports = {run_options.org_port, *(run_options.first_client_port + k for k in range(CLIENTS))}
    requests.Session.request = counted
    try:
        with ExitStack() as stack:
            rows, _, _, system = demo.run_self_running(run_options, settings_for(folder), stack,
                                                       after_round=kill_and_restart)
            registry, w3 = system.registry, system.w3
            closed_in_time, doubles = 0, 0
            for round_id in range(1, len(rows) + 1):
                info = registry.round(round_id)
                [closed] = [e for e in registry.events("RoundClosed", info.start_block)
                            if e["args"]["round"] == round_id]
                closed_at = w3.eth.get_block(closed["block_number"])["timestamp"]
                closed_in_time += closed_at <= info.deadline + CLOSE_MARGIN_SECONDS
                submitted = Counter(e["args"]["client"] for e in registry.events("UpdateSubmitted", info.start_block)
                                    if e["args"]["round"] == round_id)
                attempts = Counter((k, e["round"]) for k in system.clients for e in system.activity(k)
                                   if e["event"] == "submitted" and e["round"] == round_id)
                doubles += sum(n - 1 for n in submitted.values()) + sum(n - 1 for n in attempts.values())
            merged = [row["submissions"] for row in rows]
    finally:
        requests.Session.request = request
    log(f"restart run: updates merged per round {merged}")
    return {"rounds": len(rows), "closed_by_deadline": closed_in_time, "double_submissions": doubles,
            "http_calls_to_apps": len(app_calls), "updates_per_round": merged}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    args = parser.parse_args(argv)
    running, driven, latencies = [], [], []
    with tempfile.TemporaryDirectory(prefix="network-benchmark-") as folder:
        runs = Path(folder)
        for repeat in range(REPEATS):
            result, run_latencies = self_running(runs / f"self-running-{repeat}")
            running.append(result)
            latencies += run_latencies
            driven.append(http_driven(runs / f"http-driven-{repeat}"))
        restarts = restart_run(runs / "restart")
    result = {"self_running": {"seconds_per_round": [s for run in running for s in run["seconds_per_round"]],
                               "accuracy_per_round": running[0]["accuracy_per_round"]},
              "http_driven": {"seconds_per_round": [s for run in driven for s in run["seconds_per_round"]],
                              "accuracy_per_round": driven[0]["accuracy_per_round"]},
              "discovery_latency_s": round(statistics.median(latencies), 3), "restart_run": restarts,
              "runs_of_each": REPEATS}
    running, driven = result["self_running"], result["http_driven"]
    result["median_seconds_per_round"] = {"self_running": statistics.median(running["seconds_per_round"]),
                                          "http_driven": statistics.median(driven["seconds_per_round"])}
    return report(result, args.json)


if __name__ == "__main__":
    main()
