"""The benchmark harness, the GPU check and the roofline model (tiny shapes, the interpreter; no
timing judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytest.importorskip("triton")
from bench import gpu_correctness, roofline, run  # noqa: E402
from igu_kernels import lora_linear, tuning  # noqa: E402


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
    # On a CPU the sequential IG passes run eager, and are labelled so (triton needs a GPU here).
    assert {r["backend"] for r in records if r["op"] == "ig_nodes"} == {"eager_batched", "eager_sequential"}
    for r in records:
        assert set(r) >= {"case", "op", "backend", "shape", "dtype", "median_ms", "gbps", "device"}
        assert r["median_ms"] is not None or r["backend"] == "compile", r
    assert next(r for r in records if r["op"] == "plain_lora")["shape"]["active"] == 2  # r 4, half masked
    copy = next(r for r in records if r["op"] == "copy")
    assert copy["gbps"] > 0
    assert "x peft" in capsys.readouterr().out and data["meta"]["command"].startswith("python bench/run.py")
    assert data["goals"] == []  # GPU goals: never read off a CPU


def test_the_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(run, "write_json", lambda path, data: written.append(len(data["records"])))
    assert (
        run.main(["--preset", "tiny", "--repeats", "1", "--ops", "copy", "triplet_scores", "--json", "x"])
        == 0
    )
    assert len(written) == 2 and 0 < written[0] < written[1]  # copy, then the triplet reduction


def test_sequential_ig_passes_run_on_the_backend_they_are_labelled_with(monkeypatch):
    from bench import model_cases
    from bench.case import PRESETS

    seen = []
    monkeypatch.setenv("IGULORA_BACKEND", "auto")
    monkeypatch.setattr(
        model_cases, "integrated_gradients", lambda *a, **k: seen.append(os.environ["IGULORA_BACKEND"])
    )
    nodes = model_cases.model_cases(PRESETS["tiny"], torch.device("cpu"))[0]
    nodes.backends["eager_sequential"]()()
    assert seen == ["eager"] and os.environ["IGULORA_BACKEND"] == "auto"


def test_the_case_modules_import_one_way():
    code = "import sys, bench.model_cases, bench.case; assert 'bench.cases' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_table_and_goals_keep_cases_of_one_shape_apart():
    """Two cases of one shape (P1 twice, once with torch.compile) are timed in their own rounds."""
    shape = {"tokens": 8192, "in": 4096, "out": 4096, "r": 16, "active": 8}

    def record(case, op, backend, ms, **extra):
        r = {"case": case, "op": op, "backend": backend, "shape": shape, "dtype": "bfloat16", "median_ms": ms}
        return {**r, "gbps": None, "device": "NVIDIA H100 80GB HBM3", **extra}

    records = [
        *(
            record(0, "plain_lora", b, ms)
            for b, ms in (("base_gemm", 1.0), ("peft_eager", 1.5), ("triton", 1.2))
        ),
        *(
            record(1, "plain_lora", b, ms)
            for b, ms in (("base_gemm", 2.0), ("peft_eager", 3.0), ("triton", 2.0))
        ),
        record(2, "ig_nodes", "eager_sequential", 10.0),
        record(2, "ig_nodes", "triton_batched", 4.0),
        record(3, "score_update", "triton", 1.0, gbps=2400.0),
        record(4, "copy", "torch", 1.0, gbps=3000.0),
    ]
    goals = run.goals(records)
    assert goals[0].endswith("triton / base GEMM 1.20 (goal <= 1.15), peft_eager / triton 1.25 (goal >= 1.3)")
    assert "triton / base GEMM 1.00" in goals[1] and "8192x4096>4096 r8/16 bfloat16" in goals[1]
    assert goals[2:] == [
        "ig_nodes: eager_sequential / triton_batched 2.50 (goal >= 2.5)",
        "score_update: triton 2400 GB/s = 0.80 of copy (goal >= 0.7)",
    ]
    assert "   1.20 " in run.table(records).splitlines()[3]  # / base of case 0's triton


@pytest.mark.parametrize("op", ["plain_lora", "lora_linear_ig"])
def test_the_roofline_flops_are_the_flops_of_the_eager_step(op):
    """The work model against torch's own FLOP counter on the eager forward + backward, and the
    per-kernel model's products adding up to the same."""
    from torch.utils.flop_counter import FlopCounterMode

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
    assert roofline.low_rank_work(op, "eager", shape, torch.float32).flops == counter.get_total_flops()
    padded = {**shape, "r": 16}  # the kernels' products run at the padded rank
    kernels = roofline.kernel_work(padded, torch.float32, ig=op == "lora_linear_ig", chunks=lambda f: 3)
    assert (
        sum(w.flops for w in kernels.values())
        == roofline.low_rank_work(op, "eager", padded, torch.float32).flops
    )


def test_the_roofline_fraction_is_reported_on_a_modelled_device():
    n = 10**8
    record = {"op": "copy", "backend": "torch", "shape": {"n": n}, "dtype": "float32", "bytes_moved": 8 * n}
    on_cpu = {**record, "device": "x86_64 CPU, 2 threads", "median_ms": 1.0}
    roofline.annotate(on_cpu)
    assert set(on_cpu["sol_us"]) == set(roofline.DEVICES) and "roofline_fraction" not in on_cpu
    on_gpu = {**record, "device": "NVIDIA H200", "median_ms": 0.25}
    roofline.annotate(on_gpu)
    assert on_gpu["sol_us"]["H200"] == pytest.approx(8 * n / 4.3e12 * 1e6)
    assert on_gpu["roofline_fraction"] == pytest.approx(on_gpu["sol_us"]["H200"] / 250)


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 NVL", None),  # other peaks: no model rather than a wrong one
        ("NVIDIA H200 NVL", None),
    ],
)
def test_the_device_model_is_picked_by_the_device_name(name, key):
    assert roofline.device_key(name) == key


def test_profiled_kernels_get_their_roofline_fraction():
    shape = {"tokens": 8192, "in": 4096, "out": 4096, "r": 16, "active": 16}
    record = {"op": "plain_lora", "shape": shape, "dtype": "bfloat16", "device": "NVIDIA H100 80GB HBM3"}
    record["kernel_us"] = {"_down_kernel": 40.0, "nvjet_gemm": 300.0}
    roofline.annotate_kernels(record, roofline.P1_CHUNKS.__getitem__)
    down = roofline.kernel_work(shape, torch.bfloat16, ig=False, chunks=lambda f: 9)["_down_kernel"]
    assert record["kernel_roofline"] == {"_down_kernel": pytest.approx(down.bytes / 3.35e12 * 1e6 / 40)}


def test_the_kernel_model_uses_the_launchers_rank_and_chunks(monkeypatch):
    assert all(roofline.rank_pad(r) == lora_linear._rank_pad(r) for r in range(1, 65))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(lora_linear, "_sm_count", lambda device: 132)  # H100 SXM, H200
    shape = roofline.P1.shape
    for features, chunks in roofline.P1_CHUNKS.items():
        assert lora_linear.row_chunks(shape["tokens"], features, torch.device("cuda")) == chunks
    asked = []

    def chunks(features):
        asked.append(features)
        return 1

    roofline.kernel_work(shape, torch.bfloat16, ig=True, chunks=chunks)
    assert sorted(asked) == [16, 4096, 4096] and set(asked) == set(roofline.P1_CHUNKS)  # dE, dA, dB


def test_docs_hold_the_traffic_table_the_model_prints(capsys):
    assert roofline.main(["--traffic"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == roofline.traffic_table()
    assert printed in (ROOT / "docs" / "kernels.md").read_text()


def test_the_correctness_matrix_covers_every_rank_form_dtype_and_tile():
    full = gpu_correctness.matrix("full", tiny=False)
    keys = {(c.linear.dtype, c.ig, c.linear.rank, c.linear.masked, c.tile) for c in full}
    assert len(keys) == len(full) == 2 * 2 * 4 * gpu_correctness.tiles(torch.bfloat16)
    assert {(c.linear.tokens, c.linear.d_in, c.linear.d_out) for c in full} == set(gpu_correctness.LLM_SHAPES)
    assert {c.linear.rank for c in full} == {8, 16, 64}
    assert {c.linear.dtype for c in full} == {torch.bfloat16, torch.float16}
    tiles_per_case: dict = {}
    for c in full:  # every tile of a case on one shape, so that the tiles can be compared bitwise
        tiles_per_case.setdefault((c.linear, c.ig), set()).add(c.tile)
    assert all(t == set(range(gpu_correctness.tiles(k[0].dtype))) for k, t in tiles_per_case.items())
    p1 = gpu_correctness.matrix("p1", tiny=False)
    assert {c.linear for c in p1} == {roofline.P1} and {(c.ig, c.tile) for c in p1} == {
        (True, 0),
        (True, 1),
        (False, 0),
        (False, 1),
    }


def test_the_three_way_rule_fails_a_wrong_kernel():
    exact = torch.linspace(-3, 3, 1000, dtype=torch.float64)
    eager = exact.half()
    assert gpu_correctness.three_way(exact.half(), eager, exact, 2**-12)["ok"]
    assert not gpu_correctness.three_way(exact.half() + 0.01, eager, exact, 2**-12)["ok"]
    spike = torch.zeros(1000).index_fill_(0, torch.tensor([500]), -5.0)
    assert (
        gpu_correctness._max_abs(spike, torch.zeros(1000), chunk=7) == gpu_correctness._max_abs(spike) == 5.0
    )


def test_the_gpu_check_compares_a_case_across_tiles_bitwise(tmp_path):
    """P1's checks (one case, every tile) in the interpreter: one digest per case, and a tile
    that changed a byte would be reported as a failure."""
    out = tmp_path / "p1.json"
    assert gpu_correctness.main(["--matrix", "p1", "--tiny", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tile_invariant"] and all(data["tile_invariant"].values())
    records = [dict(r) for r in data["checks"]]
    records[1]["digest"] = "0" * 64
    assert not all(gpu_correctness.tile_invariance(records).values())


def test_a_failing_check_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def out_of_memory(check, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.75 GiB")

    monkeypatch.setattr(gpu_correctness, "run_check", out_of_memory)
    out = tmp_path / "c.json"
    assert gpu_correctness.main(["--matrix", "p1", "--tiny", "--device", "cpu", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["failed"] == data["planned"] and len(data["planned"]) == 4
    assert data["checks"][0]["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_gpu_check_dry_run_exercises_every_stage_on_a_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "log.txt").read_text()
    for stage in ("correctness_p1", "bench_p1", "correctness", "bench_gpu", "gpu_tests"):
        assert f"{stage} exit 0" in done.stdout, log[-3000:]
    assert "IGULORA_BACKEND" in (tmp_path / "environment.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    forced = {name: set() for name in lora_linear.TUNED}
    for name in ("correctness_p1", "correctness"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert [c["label"] for c in data["checks"]] == data["planned"] and not data["failed"]
        for check in data["checks"]:
            for kernel, configs in check["configs"].items():
                forced[kernel].update(json.dumps(c, sort_keys=True) for c in configs)
    for kernel, tuned in lora_linear.TUNED.items():  # every tile of every kernel was made to win
        dtype = "fp16" if tuned.dtype_arg in lora_linear.ACTIVATION_PTRS else "fp32"  # dE: fp32 rows
        expected = {json.dumps(tuning.config_record(c), sort_keys=True) for c in tuned.configs_for(dtype)}
        assert forced[kernel] == expected, kernel
    p1 = json.loads((tmp_path / "bench_p1.json").read_text())["records"]
    assert {r["op"] for r in p1} == {"plain_lora", "lora_linear_ig"}
    assert all(r["kernel_us"] for r in p1 if r["backend"] == "triton")  # the profiler ran
    gpu = json.loads((tmp_path / "bench_gpu.json").read_text())["records"]
    assert {r["op"] for r in gpu} == {"plain_lora", "lora_linear_ig", "score_update", "copy", "ig_nodes"}
    assert "correctness: 16 of 16 checks passed, 0 not reached" in done.stdout
    assert "0 launched-kernel records; max spills: 0" in done.stdout  # a CPU ran nothing
    bad = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--fast"], cwd=ROOT, env=env, capture_output=True, text=True
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
