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
    ops = ["plain_lora", "lora_linear_ig", "copy", "score_update", "ig_nodes", "ig_memory"]
    assert run.main(["--preset", "tiny", "--repeats", "1", "--json", str(out), "--ops", *ops]) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert {r["op"] for r in records} == set(ops) - {"ig_memory"}
    assert [m["nodes"] for m in data["memory"]] == [1, 2, 4, 8, 16]
    assert {"base_gemm", "eager", "triton"} <= {r["backend"] for r in records if r["op"] == "lora_linear_ig"}
    plain = {r["backend"] for r in records if r["op"] == "plain_lora"}
    assert {"base_gemm", "peft_eager", "eager", "compile", "triton"} == plain
    for r in records:
        assert set(r) >= {"op", "backend", "shape", "dtype", "median_ms", "gbps", "device"}
        assert r["median_ms"] is not None or r["backend"] == "compile", r
    copy = next(r for r in records if r["op"] == "copy")
    assert copy["gbps"] > 0
    assert "x peft" in capsys.readouterr().out and data["meta"]["command"].startswith("python bench/run.py")


@pytest.mark.parametrize("op", ["plain_lora", "lora_linear_ig"])
def test_the_roofline_flops_are_the_flops_of_the_eager_step(op):
    """The work model against torch's own FLOP counter on the eager forward + backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.roofline import low_rank_work
    from igu_kernels import reference

    M, K, N, r = 12, 20, 28, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A, E, B = (torch.randn(*s, generator=g).requires_grad_() for s in ((r, K), (r,), (N, r)))
    with FlopCounterMode(display=False) as counter:
        if op == "plain_lora":
            delta = reference.lora_delta(x, A, E, B, None, 2.0)
        else:
            ones = torch.ones(M)
            buffers = tuple(torch.zeros_like(t) for t in (A, E, B))
            delta = reference.batched_ig_lora_delta(x, A, E, B, None, 2.0, ones, ones, ones, buffers)
        (torch.nn.functional.linear(x, W) + delta).sum().backward()
    shape = {"tokens": M, "in": K, "out": N, "r": r}
    assert low_rank_work(op, "eager", shape, torch.float32).flops == counter.get_total_flops()


def test_the_roofline_fraction_is_reported_on_a_modelled_device():
    from bench.roofline import annotate

    n = 10**8
    record = {"op": "copy", "backend": "torch", "shape": {"n": n}, "dtype": "float32", "bytes_moved": 8 * n}
    on_cpu = {**record, "device": "x86_64 CPU, 2 threads", "median_ms": 1.0}
    annotate(on_cpu)
    assert set(on_cpu["sol_us"]) == {"H200", "A100"} and "roofline_fraction" not in on_cpu
    on_gpu = {**record, "device": "NVIDIA H200", "median_ms": 0.25}
    annotate(on_gpu)
    assert on_gpu["sol_us"]["H200"] == pytest.approx(8 * n / 4.3e12 * 1e6)
    assert on_gpu["roofline_fraction"] == pytest.approx(on_gpu["sol_us"]["H200"] / 250)


def test_gpu_check_dry_run_exercises_every_step_on_a_cpu(tmp_path):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for name, step in (("gpu_tests.txt", "gpu tests"), ("audit.txt", "audit"), ("bench_gpu.txt", "bench")):
        assert f"{step} exit 0" in (tmp_path / name).read_text(), (tmp_path / name).read_text()[-2000:]
    assert "backends" in (tmp_path / "environment.txt").read_text()
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["records"][0]["op"] == "copy"
    assert "0 records; max spills: 0" in (tmp_path / "launched.txt").read_text()  # a CPU ran nothing
    bad = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--fast"], cwd=root, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_compaction_bench_compares_what_each_method_keeps(tmp_path):
    """bench/compaction.py on a tiny Llama: the compacted run trains and stores for its kept
    ranks only (as many as LoRA at r = target_r, spread unevenly), the masked run for init_r."""
    from bench import compaction

    assert compaction.main(["--models", "tiny", "--rounds", "1", "--json", str(tmp_path / "c.json")]) == 0
    records = {r["method"]: r for r in json.loads((tmp_path / "c.json").read_text())["records"]}
    compacted, masked = records["igu compacted"], records["igu masked"]
    adalora = records["adalora (PEFT)"]
    assert masked["trainable_params"] == adalora["trainable_params"]  # both hold init_r = 32 ranks
    assert compacted["trainable_params"] < masked["trainable_params"] / 2  # 8 of 32 kept on average
    ratio = compacted["optimizer_state_mb"] / masked["optimizer_state_mb"]  # AdamW: 2 per parameter
    assert ratio == pytest.approx(compacted["trainable_params"] / masked["trainable_params"])
    assert all(r["median_ms_per_step"] > 0 for r in records.values())
