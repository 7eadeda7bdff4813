"""Plot helpers: the layer grid they draw from, and that they write images."""

from __future__ import annotations

import csv
import math

import pytest

from igulora.metrics import MetricsLogger
from igulora.plots import layer_grid, rank_heatmap, training_curves


def test_layer_grid_splits_names_at_the_layer_index():
    ranks = {
        "model.layers.0.self_attn.q_proj": 3,
        "model.layers.1.self_attn.q_proj": 1,
        "model.layers.1.mlp.up_proj": 2,
        "pooler.dense": 5,
    }
    layers, kinds, grid = layer_grid(ranks)
    assert layers == [-1, 0, 1] and kinds == ["mlp.up_proj", "pooler.dense", "self_attn.q_proj"]
    assert grid[1, 2] == 3 and grid[2, 0] == 2 and grid[0, 1] == 5 and math.isnan(grid[1, 0])


def test_plots_and_metrics_files(tmp_path):
    ranks = {
        f"encoder.layer.{i}.attention.self.{m}": i + j
        for i in range(3)
        for j, m in enumerate(["query", "value"])
    }
    assert (
        rank_heatmap(ranks, tmp_path / "heat.png", planted={"encoder.layer.0.attention.self.query": 2})
        .stat()
        .st_size
    )
    logger = MetricsLogger(tmp_path / "metrics.csv")
    for step in range(4):
        logger.log(
            {
                "step": step,
                "loss": 1.0 / (step + 1),
                "budget": 6 - step,
                "active_rank": 6 - step,
                "mean_score": 1.0,
                **({"ig_nodes": 3, "ig_residual": 0.25} if step % 2 == 0 else {}),  # scoring steps
            }
        )
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[1:3] == ["0,1.0,6,6,1.0,3,0.25", "1,0.5,5,5,1.0,,"]
    assert training_curves(logger.rows, tmp_path / "curves.png").stat().st_size


def test_resuming_a_metrics_file_of_other_columns_keeps_each_value_under_its_name(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,old_metric\n0,2.0,7\n1,1.5,8\n")  # an earlier version's columns
    logger = MetricsLogger(path)
    logger.log({"step": 2, "loss": 1.0, "ig_nodes": 3})
    rows = list(csv.DictReader(path.open()))
    assert [(r["step"], r["loss"], r["ig_nodes"], r["old_metric"]) for r in rows] == [
        ("0", "2.0", "", "7"),
        ("1", "1.5", "", "8"),
        ("2", "1.0", "3", ""),
    ]
    assert [r["step"] for r in logger.rows] == [0.0, 1.0, 2]
    resumed = MetricsLogger(path, resume_below=1)  # a checkpoint of step 1: later rows are redone
    assert [r["step"] for r in csv.DictReader(path.open())] == ["0"] and len(resumed.rows) == 1
    (tmp_path / "other.csv").write_text("loss\n1.0\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        MetricsLogger(tmp_path / "other.csv")


def test_resuming_cuts_the_rows_a_checkpoint_redoes(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.csv")
    for step in range(4):
        logger.log({"step": step, "loss": 1.0})
    resumed = MetricsLogger(tmp_path / "metrics.csv", resume_below=2)  # same columns: cut only
    assert [r["step"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["0", "1"]
    assert [r["step"] for r in resumed.rows] == [0.0, 1.0]
