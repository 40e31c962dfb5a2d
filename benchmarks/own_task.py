"""A problem that is in no file of the repository, learned on the full stack (Ganache, the IPFS
daemon, the organization and three devices as processes) from a task spec alone, against the same
spec trained centrally on the union of the devices' rows with the same epoch budget.

The benchmark writes each problem at run time, as a user would bring it: the organization's test
CSV (a fifth of the rows, stratified) and three non-IID device CSVs (the rest dealt by a
Dirichlet(0.5) draw over the label, or over its quartiles for a number), then a spec drafted with
`run.py task init` from device 0's file, as the README says.
- own: scikit-learn's breast_cancer (30 numeric columns; malignant or benign): test accuracy;
- regression: scikit-learn's diabetes (disease progression, a number), its age column given as a
  category (young, middle, old) that the spec's StringLookup one-hot encodes: test RMSE.
seconds_to_first_round: from starting `run.py app` with the new spec to round 1 open on chain.
The built-in tasks do not run from spec files yet: "builtin" is null.

Progress goes to stderr; the last line on stdout is one JSON object:
    {"bounds": b, "rounds": R, "own": {"metric": "accuracy", "federated": x, "central": x},
     "seconds_to_first_round": s, "regression": {"rmse_federated": x, "rmse_central": x}, "builtin": null}

    python -m benchmarks.own_task --json [--bounds none] [--only cancer|progression]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np

import demo
from benchmarks.measure import log, report, stack_settings
from processor import partition, rounds
from processor.screen import BOUNDS
from processor.device_data import read_spec_data
from processor.spec_task import read_task_file

DEVICES = 3
ROUNDS = 20
ALPHA = 0.5
SEED = 0
ROUND_SECONDS = 60  # each round's deadline: it closes sooner, once all three devices are in
TEST_SHARE = 0.2
WAIT_SECONDS = 1800  # for the rounds to be merged before the benchmark gives up


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")


def write_problem(folder: Path, header: list[str], rows: list[list[str]], groups: np.ndarray) -> list[Path]:
    """The organization's test file (`TEST_SHARE` of the rows, stratified by `groups`) and the
    devices' files (the rest, dealt non-IID over `groups`): their paths, the test file's first."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(len(rows)), test_size=TEST_SHARE, stratify=groups, random_state=SEED)
    paths = [folder / "organization.csv"]
    write_csv(paths[0], header, [rows[i] for i in test])
    for k, share in enumerate(partition.dirichlet(groups[rest], DEVICES, ALPHA, SEED)):
        paths.append(folder / f"device{k}.csv")
        write_csv(paths[-1], header, [rows[i] for i in rest[share]])
    return paths


def breast_cancer(folder: Path) -> list[Path]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    header = [name.replace(" ", "_") for name in data.feature_names] + ["diagnosis"]
    rows = [[f"{value:.6g}" for value in features] + [str(data.target_names[label])]
            for features, label in zip(data.data, data.target)]
    return write_problem(folder, header, rows, data.target)


def diabetes(folder: Path) -> list[Path]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    age = data.data[:, 0]
    tertiles = np.quantile(age, [1 / 3, 2 / 3])
    groups = np.array(["young", "middle", "old"])[np.searchsorted(tertiles, age)]
    header = ["age_group", *data.feature_names[1:], "progression"]
    rows = [[group, *(f"{value:.6g}" for value in features[1:]), f"{target:g}"]
            for group, features, target in zip(groups, data.data, data.target)]
    quartiles = np.searchsorted(np.quantile(data.target, [0.25, 0.5, 0.75]), data.target)
    return write_problem(folder, header, rows, quartiles)


def draft(folder: Path, device_file: Path, label: str, name: str) -> Path:
    """The spec `run.py task init` drafts from one device's file."""
    spec = folder / f"{name}.json"
    subprocess.run([sys.executable, str(demo.REPO_ROOT / "run.py"), "task", "init", str(device_file), "--label", label,
                    "--name", name, "--output", str(spec)], check=True, capture_output=True, timeout=300)
    return spec


def federated(folder: Path, spec: Path, files: list[Path], bounds: str) -> tuple[dict, float]:
    """The spec learned on the full stack for ROUNDS rounds: the last merged model's test metrics,
    and the seconds from starting the organization to round 1 open."""
    settings = stack_settings(folder / "state")
    options = demo.DemoOptions(task=str(spec), clients=DEVICES, rounds=ROUNDS, training=read_task_file(spec).plan,
                               seed=SEED, bounds=bounds, round_seconds=ROUND_SECONDS, straggler=False,
                               late_joiner=False,
                               org_port=demo.free_port(0), first_client_port=demo.free_port(0))
    with ExitStack() as stack:
        system = demo.FullStack(options, settings, stack)
        for k in range(DEVICES):
            system.enrol(k)
        devices = [system.client(k, ["--data", str(files[1 + k])])[0] for k in range(DEVICES)]
        org, _ = system.organization(["--rounds", str(ROUNDS), "--test-data", str(files[0])])
        for device in devices:
            device.start()
        started = time.time()
        org.start()
        deadline = started + WAIT_SECONDS
        while True:
            history = system.history()
            merged = [entry for entry in history["rounds"].values() if entry.get("model_cid")]
            if len(merged) >= ROUNDS:
                break
            ended = system.ended()
            if ended or time.time() > deadline:
                raise RuntimeError(f"{spec.name}: {len(merged)} of {ROUNDS} rounds merged: "
                                   f"{ended or 'out of time'} (logs in {system.logs})")
            time.sleep(2)
        last = history["rounds"][str(max(int(key) for key in history["rounds"]))]
        log(f"{spec.name}: rounds merged; accepted per round "
            f"{[history['rounds'][key].get('accepted') for key in sorted(history['rounds'], key=int)]}")
        return last["metrics"], history["first_opened_at"] - started


def central(spec: Path, files: list[Path]) -> dict:
    """The spec trained on the devices' rows together, for the federated run's epochs in all."""
    task = read_task_file(spec, held_out=files[0])
    tables = [read_spec_data(task.document, path) for path in files[1:]]
    x, y = np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables])
    weights = rounds.initial_model(task, seed=SEED)
    plan = replace(task.plan, epochs=task.plan.epochs * ROUNDS, ewc_lambda=0.0)
    zeros = {name: np.zeros_like(w) for name, w in weights.items()}
    trained = rounds.shared(task, rounds.train(task, weights, zeros, x, y, plan, seed=SEED))
    data = task.data()
    return task.evaluate(trained, data.x_test, data.y_test)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--bounds", choices=BOUNDS, default=BOUNDS[0],
                        help="how the organization bounds one device's influence (run.py app --bounds)")
    parser.add_argument("--only", choices=("cancer", "progression"), help="run one of the two problems")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="own-task-") as scratch:
        folder = Path(scratch)
        results = {}
        for name, make, label in (("cancer", breast_cancer, "diagnosis"), ("progression", diabetes, "progression")):
            if args.only not in (None, name):
                continue
            problem = folder / name
            problem.mkdir()
            files = make(problem)
            spec = draft(problem, files[1], label, name)
            log(f"{name}: {len(files) - 1} device files and the organization's test file; spec {spec}")
            fed, seconds = federated(problem, spec, files, args.bounds)
            results[name] = (fed, central(spec, files), seconds)
            log(f"{name}: federated {json.dumps(fed)}; central {json.dumps(results[name][1])}")
    result = {"bounds": args.bounds, "rounds": ROUNDS}
    if "cancer" in results:
        fed, central_metrics, seconds = results["cancer"]
        result.update(own={"metric": "accuracy", "federated": fed["accuracy"], "central": central_metrics["accuracy"]},
                      seconds_to_first_round=round(seconds, 1))
    if "progression" in results:
        fed, central_metrics, _ = results["progression"]
        result["regression"] = {"rmse_federated": fed["rmse"], "rmse_central": central_metrics["rmse"]}
    return report({**result, "builtin": None}, args.json)


if __name__ == "__main__":
    main()
