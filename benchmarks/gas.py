"""Gas used by the round registry on Ganache, with 1, 10 and 100 enrolled clients.

One deployment with 100 clients enrolled and a one-hour deadline per round; 1 client submits in
round 1, 10 in round 2 and 100 in round 3, each a realistic CIDv1 ("bafkrei...", 59 characters).
Clients beyond Ganache's 20 accounts get keys derived from a fixed seed (chain.client_key) and
are funded from account 0. Progress goes to stderr; the last line on stdout is one JSON object:
    {"submit_gas": {"1": max, "10": max, "100": max}, "submit_max_over_min", "start_round_gas", "close_gas",
     "finalize_gas", "register_gas", "set_rules_gas"}
submit_max_over_min is the largest submission's gas over the smallest, across all three rounds
(flat: at most 1.02). start_round_gas opens the first round; close_gas closes a round to
submissions; finalize_gas finalizes it and opens the next.

    python -m benchmarks.gas --json            # a new Ganache on a free port, in a temporary folder
    python -m benchmarks.gas --url http://127.0.0.1:8545   # that node (started there if none answers)
"""
from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from eth_account import Account

from benchmarks.measure import log, report
from infra import chain
from infra.ipfs import compute_cid

CLIENT_COUNTS = (1, 10, 100)


def measure(w3) -> dict:
    org = chain.DEV_KEYS[0]
    keys = [chain.client_key(k) for k in range(max(CLIENT_COUNTS))]
    funded = chain.fund_accounts(w3, org, [Account.from_key(key).address for key in keys])
    log(f"funded {len(funded)} extra client accounts")

    registry = chain.deploy_registry(w3, org)
    log(f"deployed the round registry at {registry.address}")
    # Every client is enrolled before round 1 (a round invites the clients enrolled before it opened);
    # round k is then submitted to by CLIENT_COUNTS[k - 1] of them, under a deadline the contract checks.
    register = [registry.add_client(org, Account.from_key(key).address).gas_used for key in keys]
    rules = registry.set_round_rules(org, chain.RoundRules(duration=3600)).gas_used
    close, finalize, submit, every = [], [], {}, []
    start = registry.start_round(org, compute_cid(b"base 1")).gas_used
    for round_id, count in enumerate(CLIENT_COUNTS, start=1):
        used = [registry.submit_update(key, round_id, compute_cid(f"delta {round_id} {k}".encode()),
                                       500 + k).gas_used
                for k, key in enumerate(keys[:count])]
        close.append(registry.close_round(org, round_id).gas_used)
        finalize.append(registry.finalize_round(org, round_id, compute_cid(f"model {round_id}".encode())).gas_used)
        submit[str(count)] = max(used)
        every += used
        log(f"round {round_id}: {count} clients submitted, {min(used)}-{max(used)} gas each")
    return {"submit_gas": submit, "submit_max_over_min": round(max(every) / min(every), 4),
            "start_round_gas": start, "close_gas": max(close), "finalize_gas": max(finalize),
            "register_gas": max(register), "set_rules_gas": rules}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="chain URL (default: a new Ganache on a free port)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    args = parser.parse_args(argv)

    url = args.url or f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="gas-benchmark-") as folder:
        with chain.Ganache(url, db_dir=Path(folder) / "db", log_path=Path(folder) / "ganache.log") as node:
            log(f"{'using the running' if node.reused else 'started'} Ganache at {url}")
            result = measure(chain.connect(url))
    return report(result, args.json)


if __name__ == "__main__":
    main()
