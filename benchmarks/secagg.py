"""Secure aggregation's cost and exactness, on Ganache and the js-ipfs daemon, mnist.

- Full stack (benchmarks.scale's run: `run.py app` and one `run.py clients --count N` process):
  seconds per round with and without secure aggregation at N = 5 and 20 (median of rounds 2..),
  and the bytes each client publishes per round: its update, its encrypted shares file, its keys.
- In one process, five clients stepped as their agents would (threshold 3): `sum_error`, the
  largest difference between the merged delta and the plain mean of the clients' deltas, and
  `dropout_recovery_s`, what one client dropping out after masking adds to a round: the
  survivors' reveals plus the organization's merge with recovery, less a merge without dropout.

    python -m benchmarks.secagg --json [--counts 5 20] [--rounds 3]

Progress goes to stderr; the last line of stdout is one JSON object:
    {"secagg": {"5": {"seconds_per_round", "plain_seconds_per_round", "bytes_per_client",
                      "plain_bytes_per_client"}, "20": ...,
                "dropout_recovery_s": s}, "sum_error": x}
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import demo
from benchmarks import scale
from benchmarks.measure import log, report
from infra import chain, ipfs
from infra.chain import MessageKind

COUNTS = (5, 20)
CLIP_NORM = 2.0


def threshold_for(clients: int) -> int:
    """Two thirds of the clients, at least 2: a round survives a third of them dropping out."""
    return max(2, math.ceil(2 * clients / 3))


def secure_flags(clients: int) -> tuple[str, ...]:
    return ("--dp-clip-norm", str(CLIP_NORM), "--secure-aggregation", "--threshold", str(threshold_for(clients)))


def published_bytes(registry: chain.Registry, store: ipfs.ContentStore) -> dict:
    """Mean bytes a client published per round: its updates, and its secure round's messages (the
    keys on chain, the shares and reveal files on IPFS)."""
    updates = [len(store.get(event["args"]["cid"])) for event in registry.events("UpdateSubmitted")]
    messages = 0
    for event in registry.events("RoundMessage"):
        kind, payload = MessageKind(event["args"]["kind"]), bytes(event["args"]["payload"])
        if kind in (MessageKind.SHARES, MessageKind.REVEAL):
            messages += len(store.get(payload.decode()))
        elif kind == MessageKind.KEYS:
            messages += len(payload)
    return {"bytes_per_client": round((sum(updates) + messages) / len(updates))}


def full_stack(counts: list[int], rounds: int, folder: Path) -> dict:
    ports = {"chain": demo.free_port(0), "ipfs": demo.free_port(0), "org": demo.free_port(0),
             "clients": demo.free_port(0)}
    figures = {}
    for count in counts:
        plain = scale.run(count, rounds, folder / f"plain-{count}", ports, measure_more=published_bytes)
        secure = scale.run(count, rounds, folder / f"secure-{count}", ports, app_flags=secure_flags(count),
                           measure_more=published_bytes)
        figures[str(count)] = {"seconds_per_round": secure["seconds_per_round"],
                               "plain_seconds_per_round": plain["seconds_per_round"],
                               "bytes_per_client": secure["bytes_per_client"],
                               "plain_bytes_per_client": plain["bytes_per_client"],
                               "accepted": secure["accepted"], "threshold": threshold_for(count)}
        log(f"{count} clients: {figures[str(count)]}")
    return figures


def in_process(folder: Path) -> dict:
    """Five clients stepped by hand through a round without dropout and one where a client drops."""
    from client.agent import ClientAgent
    from client.service import ClientConfig
    from organization.runner import RoundRunner
    from infra.secure_round import SecureRoundView
    from organization.service import OrganizationConfig
    from processor import codec
    from processor.privacy import PrivacyPlan

    clients, threshold = 5, 3
    chain_url, ipfs_api = f"http://127.0.0.1:{demo.free_port(0)}", f"http://127.0.0.1:{demo.free_port(0)}"
    with chain.local_chain("ganache", chain_url, folder / "chain"), \
            ipfs.IPFSDaemon.for_api(ipfs_api, repo_dir=folder / "ipfs", log_path=folder / "ipfs.log"):
        config = OrganizationConfig(
            task="mnist", privacy=PrivacyPlan(clip_norm=CLIP_NORM, secure_aggregation=True, threshold=threshold),
            rules=chain.RoundRules(duration=600, quorum=threshold))
        system = demo.embedded_system(folder / "state", config,
                                      [ClientConfig(client_id=k, num_clients=clients, task="mnist")
                                       for k in range(clients)], chain_url=chain_url, ipfs_api=ipfs_api)
        org = system.org.extensions["organization"]
        org.config = dataclasses.replace(org.config, rounds=10)  # after the app is made: no runner thread of its own
        runner = RoundRunner(org)
        agents = [ClientAgent(app.extensions["client"], app.extensions["jobs"]) for app in system.clients]
        runner.step()
        for agent in agents:
            org.add_client(agent.service.address)
        runner.step()

        def secure_round(submitting: list[ClientAgent]) -> tuple[float, float]:
            """One round through its stages; the seconds of the survivors' reveals and of the merge."""
            registry = org.registry
            round_id = registry.current_round()
            while registry.round(round_id).submissions < len(submitting):
                masking = SecureRoundView.of(registry, registry.round(round_id)).mask_roster is not None
                for agent in submitting if masking else agents:  # the dropout posts its keys, never its update
                    agent.check_round()
                if registry.round(round_id).submissions < len(submitting):
                    runner.step()  # the next roster
            revealing = 0.0
            if len(submitting) < len(agents):
                org.clock = lambda: time.time() + 700  # past the deadline: closed with the survivors
                runner.step()  # closes the round; waits for the reveals
                started = time.perf_counter()
                for agent in submitting:
                    agent.check_round()
                revealing = time.perf_counter() - started
            started = time.perf_counter()
            runner.step()
            merging = time.perf_counter() - started
            org.clock = time.time
            assert registry.round(round_id).finalized, runner.state
            return revealing, merging

        secure_round(agents)  # round 1 pays for first calls and traces
        _, plain_merge = secure_round(agents)
        registry = org.registry
        round_id = registry.current_round() - 1
        new = codec.decode_model(org.task, org.store.get(registry.round(round_id).model_cid)).weights
        base = codec.decode_model(org.task, org.store.get(registry.round(round_id).base_cid)).weights
        deltas = [agent.service.trained.result.delta for agent in agents]
        error = max(float(np.max(np.abs(new[n] - base[n] - np.mean([d[n] for d in deltas], axis=0))))
                    for n in new)
        revealing, recovering_merge = secure_round(agents[:-1])
    log(f"in one process: merge {plain_merge:.2f} s; with one dropout, reveals {revealing:.2f} s and merge "
        f"{recovering_merge:.2f} s; largest error of the merged mean {error:.3g}")
    return {"dropout_recovery_s": round(revealing + recovering_merge - plain_merge, 3), "sum_error": error}


def measure(counts: list[int], rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="secagg-benchmark-") as folder:
        recovery = in_process(Path(folder) / "in-process")
        stack = full_stack(counts, rounds, Path(folder))
    return {"secagg": {**stack, "dropout_recovery_s": recovery["dropout_recovery_s"]},
            "sum_error": recovery["sum_error"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="client counts to run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per full-stack run")
    args = parser.parse_args(argv)
    return report(measure(args.counts, args.rounds), args.json)


if __name__ == "__main__":
    main()
