"""The batched IG step stores activations for its rows and no per-node copies of adapter weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import tiny_llama, token_batch

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import checkpointing_memory_rows, node_memory_rows  # noqa: E402


def test_memory_grows_with_rows_not_with_nodes_times_parameters():
    config = IGULoraConfig(init_r=8, target_r=2, total_step=10, ig_window=None)
    igu = get_igu_model(tiny_llama(), config)
    igu.train()
    batch = token_batch(n=8, t=12)
    del batch["labels"]
    rows = node_memory_rows(igu, batch, causal_lm_row_loss, [1, 2, 4, 8, 16], torch.device("cpu"))
    params_mb = rows[0]["adapter_params_mb"]
    excess = [r["saved_mb"] - r["plain_same_rows_mb"] for r in rows]
    # Per-node weight copies would add params_mb per node; the batched op adds only row vectors.
    assert excess[-1] - excess[0] < 0.05 * params_mb * (16 - 1)
    assert rows[-1]["saved_mb"] > rows[0]["saved_mb"]  # activations do grow with the rows
    per_row = [(b["saved_mb"] - a["saved_mb"]) / (b["rows"] - a["rows"]) for a, b in zip(rows, rows[1:])]
    assert max(per_row) < 1.2 * min(per_row)  # linear in rows


def test_checkpointing_cuts_the_activation_memory_of_a_scoring_step():
    igu = get_igu_model(
        tiny_llama(), IGULoraConfig(init_r=4, target_r=2, total_step=10, ig_every=2, ig_window=None)
    )
    batch = token_batch(n=8, t=24)
    del batch["labels"]
    rows = checkpointing_memory_rows(igu, batch, causal_lm_row_loss, torch.device("cpu"))
    saved = {(r["checkpointing"], r["step"]): r["saved_mb"] for r in rows}
    held = {(r["checkpointing"], r["step"]): r["held_mb"] for r in rows}
    for mode in ("reentrant", "non-reentrant"):
        assert saved[mode, "scoring"] < 0.5 * saved["none", "scoring"]
        assert held[mode, "scoring"] < 0.5 * held["none", "scoring"]
    for mode in ("none", "reentrant", "non-reentrant"):
        assert saved[mode, "scoring"] > saved[mode, "plain"]  # the node rows are activations too
    assert not igu.is_gradient_checkpointing
