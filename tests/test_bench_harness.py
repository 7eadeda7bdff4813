"""The benchmark harness runs and writes well-formed records (tiny preset; no timings judged)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("triton")
from bench import run  # noqa: E402


def test_run_writes_records_and_a_ratio_table(tmp_path, capsys):
    out = tmp_path / "records.json"
    ops = ["lora_linear_ig", "copy", "score_update", "ig_nodes", "ig_memory"]
    assert run.main(["--preset", "tiny", "--repeats", "1", "--json", str(out), "--ops", *ops]) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert {r["op"] for r in records} == set(ops) - {"ig_memory"}
    assert [m["nodes"] for m in data["memory"]] == [1, 2, 4, 8, 16]
    assert {"base_gemm", "eager", "triton"} <= {r["backend"] for r in records if r["op"] == "lora_linear_ig"}
    for r in records:
        assert set(r) >= {"op", "backend", "shape", "dtype", "median_ms", "gbps", "device"}
        assert r["median_ms"] is not None or r["backend"] == "compile", r
    copy = next(r for r in records if r["op"] == "copy")
    assert copy["gbps"] > 0
    assert "x eager" in capsys.readouterr().out and data["meta"]["command"].startswith("python bench/run.py")
