"""Many clients on the full stack: Ganache, the js-ipfs daemon, the organization as `run.py app
--rounds R`, and every client in ONE `run.py clients --count N` process, mnist, at N = 10, 30, 100.

Each N on a new chain and IPFS repo. The clients are enrolled as an operator would (`run.py enrol
--clients-of N`, which funds the accounts beyond Ganache's) once their process is up, and every
round waits for all N (the quorum is N): round 1 opens once everything is up and enrolled.
Per N:
- seconds_per_round: median of rounds 2.., from the organization sending the transaction that
  opens a round to its sending the one that opens the next (its history);
- peak_mb: the largest sum, sampled every SAMPLE_SECONDS, of the RSS of every process of the run
  (the chain, IPFS, the organization, the clients; this driver excluded); peak_mb_by_process
  splits that peak sample;
- startup_s: from launching the chain to round 1 opening;
- accepted: the fewest updates a round accepted (every round: N is the goal);
- gas per submission: the largest gasUsed of the run's submitUpdate receipts;
and where a round's time goes (rounds 2..): CPU-seconds per process and per round, the devices'
seconds per round summed by phase (their activity logs), and the organization's merge by phase.
Then the same run on each chain node, Ganache and anvil, at 5 and 30 clients (--chain-counts), with
each node's CPU per mined transaction (benchmarks.chains), and with --flower the ratio of our
round to Flower's deployment engine's (benchmarks.vs_flower --only deployment).
Progress and those details go to stderr; the last line on stdout is one JSON object:
    {"clients": {"10": {"seconds_per_round", "peak_mb", "startup_s", "accepted"}, "30": ..., "100": ...},
     "chains": {"ganache": {"5": s, "30": s, "cpu_ms_per_tx": x}, "anvil": {...}},
     "gas_per_submission": {"10": g, "30": g, "100": g},
     "vs_flower_deployment": {"ratio_seconds_per_round", "ratio_cpu_seconds_per_round", "accuracy_gap_pp"}}
(with --json; without it, the details and a line per figure come first).

    python -m benchmarks.scale --json
    python -m benchmarks.scale --json --counts 10 --rounds 3 --chain-port 9146 --ipfs-port 5502 --org-port 5800 \
        --clients-port 5801
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

import demo
from benchmarks.chains import cpu_ms_per_transaction
from benchmarks.measure import log, report
from infra import chain, ipfs
from infra.files import REPO_ROOT, read_json_lines
from infra.processes import ManagedProcess, port_listens
from infra.settings import CHAIN_NODE_KINDS
from organization.service import history_path

COUNTS = (10, 30, 100)
CHAIN_COUNTS = (5, 30)  # the Ganache / anvil comparison's
ROUNDS = 3
SAMPLE_SECONDS = 0.5
BLOCK_SAMPLE_SECONDS = 0.02
ROUND_SECONDS = 900  # each round's deadline: far beyond a round's time, so a round that misses it says so
RUN_TIMEOUT = 3600


class ProcessSampler:
    """RSS and CPU-seconds of this process's descendants, sampled in a thread: the largest sum of
    RSS, and every sample's CPU-seconds per process (to tell which process a stretch of time used)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.peak_by_process: dict[str, float] = {}
        self.cpu: list[tuple[float, dict[str, float]]] = []  # (time, CPU-seconds so far by process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            rss, cpu = {}, {}
            for process in psutil.Process().children(recursive=True):
                try:
                    name = " ".join(Path(arg).name for arg in process.cmdline()[:3])
                    rss[name] = rss.get(name, 0.0) + process.memory_info().rss / 2**20
                    times = process.cpu_times()
                    cpu[name] = cpu.get(name, 0.0) + times.user + times.system
                except psutil.Error:  # ended between listing and reading
                    continue
            self.cpu.append((time.time(), cpu))
            if sum(rss.values()) > self.peak_mb:
                self.peak_mb, self.peak_by_process = sum(rss.values()), rss

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU-seconds each process used from `start` to `end` (to the nearest samples)."""
        before = next((cpu for at, cpu in reversed(self.cpu) if at <= start), {})
        after = next((cpu for at, cpu in reversed(self.cpu) if at <= end), {})
        return {name: round(used - before.get(name, 0.0), 2) for name, used in after.items()}


class BlockClock:
    """When each block was first seen, sampled every BLOCK_SAMPLE_SECONDS in a thread: block
    timestamps are whole seconds, too coarse to tell a round's stages apart."""

    def __init__(self, w3) -> None:
        self.w3, self.seen = w3, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="block-clock", daemon=True)

    def __enter__(self) -> "BlockClock":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(BLOCK_SAMPLE_SECONDS):
            try:
                number = self.w3.eth.block_number
            except Exception:  # the chain stopped first
                continue
            now = time.time()
            for block in range(last + 1, number + 1):
                self.seen[block] = now
            last = max(last, number)

    def time_of(self, block: int) -> float:
        return self.seen.get(block, min((t for b, t in list(self.seen.items()) if b >= block), default=time.time()))


def device_seconds(folder: Path, rounds: range) -> dict[str, float]:
    """Per round, the devices' seconds summed by phase (chain, ipfs, decoding, evaluation, training,
    encoding), from their activity logs: time spent, not CPU (waits on the model's lock included)."""
    totals: dict[str, float] = {}
    for activity in folder.glob("client/*/activity.jsonl"):
        for event in read_json_lines(activity):
            if event["event"] == "submitted" and event["round"] in rounds:
                for phase, seconds in event["seconds"].items():
                    totals[phase] = totals.get(phase, 0.0) + seconds / len(rounds)
    return {phase: round(seconds, 2) for phase, seconds in totals.items()}


def run_py(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "run.py"), *args]


def wait_for(what: str, condition, processes: list[ManagedProcess], timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        ended = demo.first_ended(processes)
        if ended is not None:
            raise RuntimeError(ended)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)


def run(count: int, rounds: int, folder: Path, ports: dict[str, int], node: str = "ganache",
        app_flags: tuple[str, ...] = (), measure_more=None) -> dict:
    """One run of `rounds` rounds with `count` clients on a `node` chain (ganache, anvil); its figures.
    `app_flags` go to the organization's `run.py app`; `measure_more(registry, store, clock)`, called while
    the chain and IPFS still run, adds its own figures; `clock` (a BlockClock) tells when each
    block was mined."""
    chain_url, ipfs_api = f"http://127.0.0.1:{ports['chain']}", f"http://127.0.0.1:{ports['ipfs']}"
    record, logs = folder / "deployments.json", folder / "logs"
    env = {"FL_CHAIN_URL": chain_url, "FL_IPFS_API": ipfs_api, "FL_CONTRACT_RECORD": str(record),
           "FL_STATE_DIR": str(folder), **demo.compute_threads(2)}  # two TensorFlow processes share the cores
    with ExitStack() as stack, ProcessSampler() as processes:
        launched = time.time()
        stack.enter_context(chain.local_chain(node, chain_url, folder))
        stack.enter_context(ipfs.IPFSDaemon.for_api(ipfs_api, repo_dir=folder / "ipfs", log_path=logs / "ipfs.log"))
        org = ManagedProcess("organization", run_py(
            "app", "--task", "mnist", "--rounds", str(rounds), "--quorum", str(count), "--round-seconds",
            str(ROUND_SECONDS), "--port", str(ports["org"]), *app_flags), lambda: port_listens(ports["org"]),
            log_path=logs / "organization.log", env=env, cwd=REPO_ROOT, ready_timeout=600)
        stack.callback(org.stop)
        clients = ManagedProcess("clients", run_py("clients", "--count", str(count), "--task", "mnist", "--port",
                                                   str(ports["clients"])), lambda: port_listens(ports["clients"]),
                                 log_path=logs / "clients.log", env=env, cwd=REPO_ROOT, ready_timeout=600)
        stack.callback(clients.stop)
        org.start()
        w3 = chain.connect(chain_url)
        clock = stack.enter_context(BlockClock(w3))
        wait_for("the organization's deployment", lambda: chain.find_deployment(w3, record), [org])
        registry = chain.Registry(w3, chain.find_deployment(w3, record))
        clients.start()
        log(f"{count} clients: up {time.time() - launched:.1f} s after launch; enrolling them")
        subprocess.run(run_py("enrol", "--clients-of", str(count)), env={**os.environ, **env}, cwd=REPO_ROOT,
                       check=True, capture_output=True)
        history = history_path(folder, registry.address)

        def finished() -> bool:
            done = json.loads(history.read_text()).get("rounds", {}) if history.exists() else {}
            return sum("next_opening_sent_at" in entry for entry in done.values()) >= rounds  # each one finalized

        wait_for(f"{rounds} rounds with {count} clients", finished, [org, clients])
        entries = json.loads(history.read_text())
        gas = [w3.eth.get_transaction_receipt(event["tx_hash"])["gasUsed"]
               for event in registry.events("UpdateSubmitted")]
        more = measure_more(registry, ipfs.open_store(ipfs_api, folder), clock) if measure_more else {}
    opened = [entries["first_opening_sent_at"]] + [entries["rounds"][str(r)]["next_opening_sent_at"]
                                                   for r in range(1, rounds + 1)]
    seconds = [round(b - a, 2) for a, b in zip(opened, opened[1:])]
    accepted = [entries["rounds"][str(r)]["accepted"] for r in range(1, rounds + 1)]
    phases = [entries["rounds"][str(r)]["seconds"] for r in range(1, rounds + 1)]  # the merge's
    figures = {"seconds_per_round": round(statistics.median(seconds[1:] or seconds), 2),
               "peak_mb": round(processes.peak_mb), "startup_s": round(opened[0] - launched, 1),
               "accepted": min(accepted)}
    later = range(2, rounds + 1) if rounds > 1 else range(1, 2)  # round 1 pays for first calls and traces
    details = {"seconds": seconds, "accepted": accepted, "gas": [min(gas), max(gas)],
               "organization_seconds": phases,
               "cpu_seconds_per_round": {name: round(used / len(later), 2) for name, used in processes.cpu_between(
                   opened[later[0] - 1], opened[later[-1]]).items()},
               "device_seconds_per_round": device_seconds(folder, later),
               "peak_mb_by_process": {name: round(mb) for name, mb in processes.peak_by_process.items()}}
    log(f"{count} clients: {figures}; {json.dumps(details)}")
    return {**figures, "gas": max(gas), "details": details, **more}


def flower_deployment_ratio() -> dict:
    """benchmarks.vs_flower's comparison with Flower's deployment engine, run as its own command."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.vs_flower", "--json", "--only", "deployment"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["vs_flower_deployment"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="client counts to run")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per run")
    parser.add_argument("--chain-port", type=int, help="Ganache's port (default: a free one)")
    parser.add_argument("--ipfs-port", type=int, help="the IPFS API's port (default: a free one)")
    parser.add_argument("--org-port", type=int, help="the organization's app port (default: a free one)")
    parser.add_argument("--clients-port", type=int, help="the clients' status port (default: a free one)")
    parser.add_argument("--chain-counts", type=int, nargs="*", default=list(CHAIN_COUNTS),
                        help="client counts of the Ganache / anvil comparison (none: skip it)")
    parser.add_argument("--flower", action="store_true", help="also run benchmarks.vs_flower's deployment "
                                                               "comparison (Flower's SuperLink and SuperNodes)")
    args = parser.parse_args(argv)
    ports = {"chain": args.chain_port or demo.free_port(0), "ipfs": args.ipfs_port or demo.free_port(0),
             "org": args.org_port or demo.free_port(0), "clients": args.clients_port or demo.free_port(0)}
    runs, nodes = {}, {}
    with tempfile.TemporaryDirectory(prefix="scale-benchmark-") as folder:
        for count in args.counts:
            runs[count] = run(count, args.rounds, Path(folder) / str(count), ports)
        for kind in CHAIN_NODE_KINDS if args.chain_counts else ():
            nodes[kind] = {str(n): run(n, args.rounds, Path(folder) / f"{kind}-{n}", ports, node=kind)
                           ["seconds_per_round"] for n in args.chain_counts}
            with chain.local_chain(kind, f"http://127.0.0.1:{ports['chain']}", Path(folder) / f"{kind}-tx") as node:
                nodes[kind]["cpu_ms_per_tx"] = round(cpu_ms_per_transaction(node), 2)
            log(f"{kind}: {nodes[kind]}")
    result = {"clients": {str(n): {key: r[key] for key in ("seconds_per_round", "peak_mb", "startup_s", "accepted")}
                          for n, r in runs.items()},
              "gas_per_submission": {str(n): r["gas"] for n, r in runs.items()}}
    if nodes:
        result["chains"] = nodes
    if args.flower:
        result["vs_flower_deployment"] = flower_deployment_ratio()
    if not args.json:
        for n, r in runs.items():
            print(f"{n} clients: {json.dumps(r['details'])}")
    return report(result, args.json)


if __name__ == "__main__":
    main()
