"""The two local chain nodes side by side, Ganache and anvil: the node's CPU per mined transaction,
and the full stack's round on each.

Per node, in turn:
- a fresh node on a free port runs the contract's round traffic: 20 enrolled clients, rounds of 20
  submissions each signed here and sent raw, then close and finalize; the node's own CPU time
  (its process tree, psutil) over the transactions it mined is the cost per transaction;
- the demo's full stack runs by itself on that node (the js-ipfs daemon, the organization and
  `--clients` client processes, mnist, no straggler) for `--rounds` rounds: the median seconds per
  round, rounds 2 and later (the first carries start-up).

Progress goes to stderr; the last line on stdout is one JSON object:
    {"ganache": {"cpu_ms_per_tx": x, "seconds_per_round": {"5": s}}, "anvil": {...}}

    python -m benchmarks.chains --json [--clients 5] [--rounds 4]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import psutil
from eth_account import Account

from benchmarks.measure import log, report, stack_settings
from demo import DemoOptions, free_port, run_self_running
from infra import chain
from infra.ipfs import compute_cid
from infra.settings import CHAIN_NODE_KINDS

TX_CLIENTS, TX_ROUNDS = 20, 3  # chain-only traffic: 20 submissions a round, plus close and finalize


def node_cpu_seconds(node: chain.LocalChain) -> float:
    """CPU-seconds the node's process and its children have used so far."""
    root = psutil.Process(node.process.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def cpu_ms_per_transaction(node: chain.LocalChain) -> float:
    """The node's CPU per mined transaction over rounds of TX_CLIENTS submissions, close and finalize."""
    w3 = chain.connect(node.url)
    org, keys = chain.DEV_KEYS[0], chain.DEV_KEYS[1:1 + TX_CLIENTS]
    registry = chain.deploy_registry(w3, org)
    for key in keys:
        registry.add_client(org, Account.from_key(key).address)
    registry.set_round_rules(org, chain.RoundRules(duration=3600))
    registry.start_round(org, compute_cid(b"base 1"))
    used, sent = node_cpu_seconds(node), 0
    for round_id in range(1, TX_ROUNDS + 1):
        for k, key in enumerate(keys):
            registry.submit_update(key, round_id, compute_cid(f"delta {round_id} {k}".encode()), 500 + k)
        registry.close_round(org, round_id)
        registry.finalize_round(org, round_id, compute_cid(f"model {round_id}".encode()))
        sent += len(keys) + 2
    return 1000 * (node_cpu_seconds(node) - used) / sent


def full_stack_round(kind: str, clients: int, rounds: int, folder: Path) -> float:
    """The median seconds per round (rounds 2 and later) of the self-running demo on a `kind` node."""
    settings = stack_settings(folder / f"stack-{kind}", chain_node=kind)
    options = replace(DemoOptions(clients=clients, rounds=rounds, round_seconds=60, straggler=False,
                                  late_joiner=False, org_port=free_port(0), first_client_port=free_port(0)),
                      plot_path=folder / "plot.png")
    with ExitStack() as stack:
        rows, *_ = run_self_running(options, settings, stack)
    return statistics.median(row["seconds"] for row in rows[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5, help="client processes of the full stack")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the full stack on each node")
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    args = parser.parse_args(argv)

    result = {}
    with tempfile.TemporaryDirectory(prefix="chains-benchmark-") as folder:
        for kind in CHAIN_NODE_KINDS:
            url = f"http://127.0.0.1:{free_port(0)}"
            with chain.local_chain(kind, url, Path(folder) / kind) as node:
                cpu = cpu_ms_per_transaction(node)
            log(f"{kind}: {cpu:.2f} CPU-ms per mined transaction")
            seconds = full_stack_round(kind, args.clients, args.rounds, Path(folder))
            log(f"{kind}: {seconds:.2f} s per round with {args.clients} clients")
            result[kind] = {"cpu_ms_per_tx": round(cpu, 2), "seconds_per_round": {str(args.clients): round(seconds, 2)}}
    return report(result, args.json)


if __name__ == "__main__":
    main()
