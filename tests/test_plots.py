"""The per-round plots render to PNG files of the expected size."""
from __future__ import annotations

import io

import matplotlib.pyplot as plt

from infra.plots import accuracy_png, round_cost_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_accuracy_png_is_written_where_asked(tmp_path):
    data = accuracy_png({"a": [(0, 0.1), (1, 0.8)], "b": [(0, 0.1), (1, 0.7)]}, "title", tmp_path / "acc.png")
    assert data[:8] == PNG_MAGIC and (tmp_path / "acc.png").read_bytes() == data
    assert plt.imread(io.BytesIO(data)).shape[:2] == (360, 640)


def test_round_cost_png_draws_wall_and_cpu_seconds_side_by_side(tmp_path):
    runs = {"flower": {"seconds_per_round": [11.7, 0.7, 0.7], "cpu_seconds_per_round": [19.1, 1.0, 1.0]},
            "ours": {"seconds_per_round": [3.1, 1.0, 0.9], "cpu_seconds_per_round": [5.8, 1.9, 1.8]}}
    data = round_cost_png(runs, "title", tmp_path / "cost.png")
    assert data[:8] == PNG_MAGIC and (tmp_path / "cost.png").read_bytes() == data
    assert plt.imread(io.BytesIO(data)).shape[:2] == (360, 960)
