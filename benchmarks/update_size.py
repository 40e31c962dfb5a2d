"""Bytes of one client update as float32 and as float16, and what float16 costs in accuracy.

    python -m benchmarks.update_size [--json] [--rounds 5] [--clients 3]

Size: a real mnist delta (one local epoch from the initial model) encoded by codec.encode_delta
both ways; the safetensors header is counted. Accuracy cost: the embedded demo (every role in
one process, the same API and round code as the full stack, updates published as safetensors
and decoded by the organization) run twice on the same work, the clients publishing float32 and
then float16 deltas (client flag --update-dtype); cost = final test accuracy with float32 minus
with float16, in percentage points. Progress goes to stderr; with --json the last stdout line is
{"bytes_float32", "bytes_compact", "compact_dtype", "accuracy_cost_pp", "accuracy_float32", "accuracy_compact"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.measure import log, record_result
from processor import codec, rounds
from processor.tasks import get_task
from processor.training import TrainingSettings


def delta_bytes(task_name: str, dtype: str) -> int:
    task = get_task(task_name)
    base = rounds.make_base(task, rounds.initial_model(task))
    x, y = task.client_data(0, 3, scheme="iid")
    result = rounds.local_update(task, base.weights, base.fisher, x, y, TrainingSettings(), seed=0)
    return len(codec.encode_delta(task, result.delta, round_id=1, base_cid="bafy", num_samples=result.num_samples,
                                  client="0x" + "0" * 40, dtype=dtype))


def final_accuracy(args: argparse.Namespace, dtype: str, state_dir: Path) -> float:
    from demo import DemoOptions, run_demo
    from infra.settings import Settings

    options = DemoOptions(task=args.task, clients=args.clients, rounds=args.rounds, partition=args.partition,
                          training=TrainingSettings(update_dtype=dtype), embedded=True,
                          plot_path=state_dir / f"{dtype}.png")
    stdout, sys.stdout = sys.stdout, sys.stderr  # the demo's table is progress; stdout keeps the JSON
    try:
        report = run_demo(options, Settings.from_env(state_dir=state_dir))
    finally:
        sys.stdout = stdout
    return report["rounds"][-1]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    compact = "float16"
    sizes = {dtype: delta_bytes(args.task, dtype) for dtype in ("float32", compact)}
    log(f"delta bytes: float32 {sizes['float32']:,}, {compact} {sizes[compact]:,}")
    with tempfile.TemporaryDirectory() as tmp:
        accuracy = {dtype: final_accuracy(args, dtype, Path(tmp) / dtype) for dtype in ("float32", compact)}
    figures = {"bytes_float32": sizes["float32"], "bytes_compact": sizes[compact], "compact_dtype": compact,
               "accuracy_cost_pp": round(100 * (accuracy["float32"] - accuracy[compact]), 2),
               "accuracy_float32": accuracy["float32"], "accuracy_compact": accuracy[compact]}
    log(f"final accuracy after {args.rounds} rounds: float32 {100 * accuracy['float32']:.2f}%, "
        f"{compact} {100 * accuracy[compact]:.2f}%")
    record_result(figures)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
