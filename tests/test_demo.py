"""The demo, end to end: embedded in one process, and as the real stack of separate processes."""
from __future__ import annotations

import json

import pytest

import demo
from demo import DemoOptions, run_demo
from infra import chain, ipfs
from infra.settings import Settings
from processor import codec
from processor.tasks import get_task
from processor.training import TrainingSettings

TASK = "digits"


def check_report(report: dict, rounds: int, clients: int) -> None:
    assert [row["round"] for row in report["rounds"]] == list(range(1, rounds + 1))
    assert all(row["submissions"] == clients for row in report["rounds"])
    assert all(row["gas"] > 0 and row["bytes"] > 0 for row in report["rounds"])
    # training alone keeps a core busy most of the round (cpu_seconds counts every core of the machine)
    assert all(row["cpu_seconds"] >= 0.3 * row["seconds"] for row in report["rounds"]), report["rounds"]
    assert report["rounds"][-1]["accuracy"] > report["initial_accuracy"] + 0.2


def test_embedded_demo_runs_every_role_in_one_process(tmp_path):
    options = DemoOptions(task=TASK, clients=2, rounds=2, training=TrainingSettings(epochs=3), embedded=True,
                          json_path=tmp_path / "report.json", plot_path=tmp_path / "accuracy.png")
    report = run_demo(options, Settings.from_env(state_dir=tmp_path))
    check_report(report, rounds=2, clients=2)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cores, processes, threads", [(2, 5, "1"), (8, 2, "4"), (8, 3, "2"), (1, 1, "1")])
def test_each_process_of_the_stack_gets_its_share_of_the_cores(monkeypatch, cores, processes, threads):
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    pools = demo.compute_threads(processes)
    assert set(pools) == {"TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OPENBLAS_NUM_THREADS"}
    assert set(pools.values()) == {threads}


@pytest.mark.e2e
@pytest.mark.ganache
@pytest.mark.ipfs_daemon
def test_full_stack_as_separate_processes(tmp_path, ganache_url, ipfs_api):
    """Ganache, the IPFS daemon, the organization and two clients, each its own process."""
    settings = Settings.from_env(state_dir=tmp_path, chain_url=ganache_url, ipfs_api=ipfs_api)
    options = DemoOptions(task=TASK, clients=2, rounds=2, training=TrainingSettings(epochs=3),
                          plot_path=tmp_path / "accuracy.png",
                          org_port=5400, first_client_port=5410)
    report = run_demo(options, settings)
    check_report(report, rounds=2, clients=2)

    # The chain records both rounds, every submission, and the model each round produced ...
    w3 = chain.connect(ganache_url)
    address = chain.find_deployment(w3, tmp_path / "demo" / "deployments.json")
    registry = chain.Registry(w3, address)
    assert registry.current_round() == 3
    store = ipfs.open_store(ipfs_api, tmp_path)
    task = get_task(TASK)
    data = task.data()
    for round_id in (1, 2):
        info = registry.round(round_id)
        assert info.finalized and info.submissions == 2
        # ... and IPFS holds exactly those files, which decode against the task.
        for sub in registry.submissions(round_id):
            delta, meta = codec.decode_delta(task, store.get(sub.cid), expected_round=round_id,
                                             expected_base_cid=info.base_cid)
            assert meta["client"].lower() == sub.client.lower()
        weights, _, _ = codec.decode_model(task, store.get(info.model_cid))
        accuracy = task.evaluate(weights, data.x_test, data.y_test)["accuracy"]
        assert accuracy == pytest.approx(report["rounds"][round_id - 1]["accuracy"])
    assert registry.round(3).base_cid == registry.round(2).model_cid
