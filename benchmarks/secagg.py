"""Secure aggregation's cost and exactness, on Ganache and the js-ipfs daemon, mnist.

- Full stack (benchmarks.scale's run: `run.py app` and one `run.py clients --count N` process):
  seconds per round with and without secure aggregation at N = 5 and 20 (median of rounds 2..),
  and the bytes each client publishes per round: its update, its encrypted shares file, its keys.
- In one process, five clients stepped as their agents would (threshold 3): `sum_error`, the
  largest difference between the merged delta and the plain mean of the clients' deltas, and
  `dropout_recovery_s`, what one client dropping out after masking adds to a round: the
  survivors' unmasks plus the organization's merge with its masks removed, less the same without
  dropout.
- Attacks (`hostile`, benchmarks.secagg_attacks): 10 secure rounds of digits among 15 clients
  (threshold 3, 3 groups), one always late (it adds its masked update to IPFS as the round closes
  without it) and one always dropping out after its keys and shares, with a 16th client hostile in
  a different way each round, against the same rounds without it: `exposed_updates`, the updates
  an outside reader of the chain and IPFS unmasks (correlation above 0.5 with the client's delta),
  `rounds_voided`, the rounds that merged nothing, `accuracy_gap_pp`, the test accuracy after the
  last round without the hostile client less with it, and `steering_cost_pp`, the same after its
  steering rounds.

    python -m benchmarks.secagg --json [--counts 20 100] [--rounds 3] [--parts hostile recovery timing]

Progress goes to stderr; the last line of stdout is one JSON object:
    {"exposed_updates": n, "rounds": 10, "rounds_voided": n, "accuracy_gap_pp": x, "steering_cost_pp": x,
     "dropout_recovery_s": s, "sum_error": x,
     "secagg": {"20": {"seconds_per_round", "plain_seconds_per_round", "bytes_per_client",
                       "plain_bytes_per_client"}, "100": ...}, "ratio_vs_plain": {"20": x, "100": x}}
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

COUNTS = (20, 100)
PARTS = ("hostile", "recovery", "timing")
CLIP_NORM = 2.0


def threshold_for(clients: int) -> int:
    """Two thirds of the clients, at least 2: a round survives a third of them dropping out."""
    return max(2, math.ceil(2 * clients / 3))


def secure_flags(clients: int) -> tuple[str, ...]:
    # a stage lasts until every client's message is in, or a minute: long enough for 100 clients' keys
    # in round 1 (10 s, the default, left 33 of 100 out), never reached at 20
    return ("--dp-clip-norm", str(CLIP_NORM), "--secure-aggregation", "--threshold", str(threshold_for(clients)),
            "--stage-seconds", "60")


def stage_times(registry: chain.Registry, clock: scale.BlockClock) -> list[dict]:
    """Per round after the first, the seconds from its opening at which each stage's last message
    was mined (each client's keys, the rosters, the updates, the unmasks), and its finalizing."""
    marks: dict[int, dict[str, float]] = {}
    for name in ("RoundStarted", "RoundMessage", "UpdateSubmitted", "RoundClosed", "RoundFinalized"):
        for event in registry.events(name):
            stage = MessageKind(event["args"]["kind"]).name.lower() if name == "RoundMessage" else name
            round_marks = marks.setdefault(event["args"]["round"], {})
            round_marks[stage] = max(round_marks.get(stage, 0.0), clock.time_of(event["block_number"]))
    stages = []
    for round_id in sorted(marks)[1:]:
        opened = marks[round_id].pop("RoundStarted")
        stages.append({stage: round(at - opened, 2) for stage, at in sorted(marks[round_id].items(),
                                                                            key=lambda item: item[1])})
    return stages


def published_bytes(registry: chain.Registry, store: ipfs.ContentStore, clock: scale.BlockClock) -> dict:
    """Mean bytes a client published per round: its updates, and its secure round's messages (the
    keys and unmasks on chain, the shares and reveal files on IPFS); and when each stage of the
    rounds ended (`stage_times`)."""
    updates = [len(store.get(event["args"]["cid"])) for event in registry.events("UpdateSubmitted")]
    messages = 0
    for event in registry.events("RoundMessage"):
        kind, payload = MessageKind(event["args"]["kind"]), bytes(event["args"]["payload"])
        if kind in (MessageKind.SHARES, MessageKind.REVEAL):
            messages += len(store.get(payload.decode()))
        elif kind in (MessageKind.KEYS, MessageKind.UNMASK):
            messages += len(payload)
    return {"bytes_per_client": round((sum(updates) + messages) / len(updates)),
            "stage_times": stage_times(registry, clock)}


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
        log(f"{count} clients: {figures[str(count)]}; stage times, plain: {plain['stage_times']}, "
            f"secure: {secure['stage_times']}")
    return figures


def stepped_network(folder: Path, config, client_configs: list, chain_url: str, ipfs_api: str, rounds: int):
    """The organization (running `rounds` rounds), its runner and an agent per client, on the chain
    and IPFS node given, every client enrolled and round 1 open; no thread runs: the caller steps them."""
    from client.agent import ClientAgent
    from organization.runner import RoundRunner

    system = demo.embedded_system(folder / "state", config, client_configs, chain_url=chain_url, ipfs_api=ipfs_api)
    org = system.org.extensions["organization"]
    org.config = dataclasses.replace(org.config, rounds=rounds)  # after the app is made: no runner thread of its own
    runner = RoundRunner(org)
    agents = [ClientAgent(app.extensions["client"], app.extensions["jobs"]) for app in system.clients]
    runner.step()  # deploys
    for agent in agents:
        org.add_client(agent.service.address)
    runner.step()  # opens round 1
    return org, runner, agents


def in_process(folder: Path) -> dict:
    """Five clients stepped by hand through a round without dropout and one where a client drops."""
    from client.agent import ClientAgent
    from client.service import ClientConfig
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
        org, runner, agents = stepped_network(folder, config, [ClientConfig(client_id=k, num_clients=clients,
                                                                            task="mnist") for k in range(clients)],
                                              chain_url, ipfs_api, rounds=10)

        def secure_round(submitting: list[ClientAgent]) -> tuple[float, float]:
            """One round through its stages; the seconds of the survivors' unmasks and of the merge."""
            registry = org.registry
            round_id = registry.current_round()
            while registry.round(round_id).submissions < len(submitting):
                masking = SecureRoundView.of(registry, registry.round(round_id)).mask_roster is not None
                for agent in submitting if masking else agents:  # the dropout posts its keys, never its update
                    agent.check_round()
                if registry.round(round_id).submissions < len(submitting):
                    runner.step()  # the next roster
            if len(submitting) < len(agents):
                org.clock = lambda: time.time() + 700  # past the deadline: closed with the survivors
            runner.step()  # closes the round; posts the unmask roster
            started = time.perf_counter()
            for agent in submitting:
                agent.check_round()
            unmasking = time.perf_counter() - started
            started = time.perf_counter()
            runner.step()
            merging = time.perf_counter() - started
            org.clock = time.time
            assert registry.round(round_id).finalized, runner.state
            return unmasking, merging

        secure_round(agents)  # round 1 pays for first calls and traces
        plain_unmask, plain_merge = secure_round(agents)
        registry = org.registry
        round_id = registry.current_round() - 1
        new = codec.decode_model(org.task, org.store.get(registry.round(round_id).model_cid)).weights
        base = codec.decode_model(org.task, org.store.get(registry.round(round_id).base_cid)).weights
        deltas = [agent.service.trained.result.delta for agent in agents]
        error = max(float(np.max(np.abs(new[n] - base[n] - np.mean([d[n] for d in deltas], axis=0))))
                    for n in new)
        unmasking, recovering_merge = secure_round(agents[:-1])
    log(f"in one process: unmasks {plain_unmask:.2f} s and merge {plain_merge:.2f} s; with one dropout, "
        f"unmasks {unmasking:.2f} s and merge {recovering_merge:.2f} s; largest error of the merged mean {error:.3g}")
    return {"dropout_recovery_s": round(unmasking + recovering_merge - plain_unmask - plain_merge, 3),
            "sum_error": error}


HOSTILE_CLIENTS = 15  # with threshold 3 and 3 groups: groups of 5, so a group loses its late and dropout and holds
HOSTILE_THRESHOLD = 3
HOSTILE_DURATION = 600


def hostile_run(folder: Path, with_hostile: bool, rounds: int, kinds: list[str]) -> dict:
    """`rounds` secure rounds of digits among HOSTILE_CLIENTS clients (threshold 3, 3 groups), one
    always late and one always dropping out after its keys and shares; with `with_hostile`, one
    more misbehaving by each of `kinds` in turn. The test accuracy after each round,
    how many rounds merged nothing, and what an outside reader makes of every update it finds."""
    from benchmarks.secagg_attacks import Cast, HostileClient, pump_round, unmask_attempts
    from client.service import ClientConfig
    from organization.service import OrganizationConfig
    from processor.privacy import PrivacyPlan
    from processor.training import TrainingSettings

    # exclusion_rounds 0: a hostile client is barred after the round it is caught in, which would
    # leave the next kinds untried
    plan = PrivacyPlan(clip_norm=CLIP_NORM, secure_aggregation=True, threshold=HOSTILE_THRESHOLD, secure_groups=3,
                       exclusion_rounds=0)
    count = HOSTILE_CLIENTS + with_hostile
    chain_url, ipfs_api = f"http://127.0.0.1:{demo.free_port(0)}", f"http://127.0.0.1:{demo.free_port(0)}"
    with chain.local_chain("ganache", chain_url, folder / "chain"), \
            ipfs.IPFSDaemon.for_api(ipfs_api, repo_dir=folder / "ipfs", log_path=folder / "ipfs.log"):
        config = OrganizationConfig(task="digits", privacy=plan, stage_seconds=5.0,
                                    training=TrainingSettings(epochs=5, learning_rate=0.1),
                                    rules=chain.RoundRules(duration=HOSTILE_DURATION, quorum=HOSTILE_THRESHOLD))
        # the honest clients hold the same data in both runs: the hostile one is the last client of 16
        org, runner, agents = stepped_network(
            folder, config, [ClientConfig(client_id=k, num_clients=HOSTILE_CLIENTS + 1, task="digits")
                             for k in range(count)], chain_url, ipfs_api, rounds=rounds + 1)
        cast = Cast(hostile=agents[-1] if with_hostile else None, late=agents[0], dropout=agents[1])
        hostile = HostileClient(agents[-1].service.address, plan)
        accuracy, voided, exposed, tried, largest_correlation = [], 0, 0, [], 0.0
        with hostile.installed():
            for number in range(rounds):
                hostile.kind = kinds[number % len(kinds)] if with_hostile else None
                round_id, late_cid = pump_round(runner, agents, cast, hostile, plan, HOSTILE_DURATION)
                entry = org.history()["rounds"].get(str(round_id), {})
                assert org.registry.round(round_id).finalized, runner.state
                truths = {a.service.address: a.service.trained.result.delta for a in agents
                          if a.service.trained is not None and a.service.trained.round_id == round_id}
                correlations = unmask_attempts(org.registry, org.store, org.task, round_id, plan,
                                          {cast.late.service.address: late_cid} if late_cid else {}, truths)
                exposed += sum(correlation > 0.5 for correlation in correlations.values())
                largest_correlation = max([largest_correlation, *map(abs, correlations.values())])
                voided += entry.get("accepted", 0) == 0
                accuracy.append(entry["metrics"]["accuracy"])
                tried.append(hostile.kind)
                log(f"round {round_id} ({hostile.kind or 'no hostile client'}): accuracy {accuracy[-1]:.4f}, "
                    f"{entry.get('accepted')} updates merged of {entry.get('submissions')}, "
                    f"{len(correlations)} updates read from outside, largest |correlation| with the truth {largest_correlation:.3f}")
    return {"accuracy": accuracy, "rounds_voided": voided, "exposed_updates": exposed, "kinds": tried,
            "largest_correlation": round(largest_correlation, 4)}


def hostile(folder: Path, rounds: int, kinds: list[str]) -> dict:
    """A hostile run and the same run without the hostile client: rounds voided, the accuracy gap
    after the last round, and what the steering rounds cost against the same rounds without it."""
    attacked = hostile_run(folder / "hostile", True, rounds, kinds)
    clean = hostile_run(folder / "clean", False, rounds, kinds)
    steering = [clean["accuracy"][k] - attacked["accuracy"][k] for k, kind in enumerate(attacked["kinds"])
                if kind == "steer"]
    return {"exposed_updates": attacked["exposed_updates"] + clean["exposed_updates"], "rounds": rounds,
            "rounds_voided": attacked["rounds_voided"],
            "accuracy_gap_pp": round(100 * (clean["accuracy"][-1] - attacked["accuracy"][-1]), 2),
            "steering_cost_pp": round(100 * max(steering, default=0.0), 2),
            "largest_correlation": max(attacked["largest_correlation"], clean["largest_correlation"]),
            "accuracy": {"hostile": attacked["accuracy"], "clean": clean["accuracy"]}, "kinds": attacked["kinds"]}


def measure(counts: list[int], rounds: int, hostile_rounds: int, parts: list[str],
            kinds: list[str] | None = None) -> dict:
    from benchmarks.secagg_attacks import KINDS

    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="secagg-benchmark-") as folder:
        if "hostile" in parts:
            figures.update(hostile(Path(folder) / "hostile", hostile_rounds, kinds or list(KINDS)))
        if "recovery" in parts:
            recovery = in_process(Path(folder) / "in-process")
            figures.update(dropout_recovery_s=recovery["dropout_recovery_s"], sum_error=recovery["sum_error"])
        if "timing" in parts:
            stack = full_stack(counts, rounds, Path(folder))
            figures["secagg"] = stack
            figures["ratio_vs_plain"] = {n: round(f["seconds_per_round"] / f["plain_seconds_per_round"], 2)
                                         for n, f in stack.items()}
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="client counts to run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per full-stack run")
    parser.add_argument("--hostile-rounds", type=int, default=10, help="rounds of each hostile and clean run")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--kinds", nargs="+", help="the hostile client's kinds, in turn (default: all of "
                                                   "benchmarks.secagg_attacks.KINDS)")
    args = parser.parse_args(argv)
    return report(measure(args.counts, args.rounds, args.hostile_rounds, args.parts, args.kinds), args.json)


if __name__ == "__main__":
    main()
