"""Run every benchmark case side by side and write JSON records.

    python bench/run.py --json bench/results/cpu.json            # preset by device
    python bench/run.py --preset tiny --json /tmp/smoke.json      # seconds: checks the harness
    python bench/run.py --preset gpu --profile --json out.json    # with per-kernel profiler times

Records: {case, op, backend, shape, dtype, median_ms, gbps, device}. The table gives each
backend's speed-up over the eager reference of the same case and, for the low-rank linear, the
time relative to the frozen base GEMM alone, timed in the same rounds; on a GPU the goals of the
kernels issue follow it. The JSON file is rewritten after every case, so a run stopped by a time
limit keeps what it measured. Triton runs on a CPU only in its interpreter, for the harness's
tests: no timing or goal is read off that.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import roofline  # noqa: E402
from bench.case import PRESETS, Case  # noqa: E402
from bench.cases import OPS, all_cases  # noqa: E402
from bench.record import device_name, meta  # noqa: E402
from bench.timing import interleaved_median_ms, synchronize  # noqa: E402
from igu_kernels.audit import launched  # noqa: E402
from igulora.io import write_json  # noqa: E402

EXTRA_OPS = ("ig_memory", "checkpoint_memory")  # the memory tables, not timed cases


def kernel_us(fn: Callable[[], object], device: torch.device, iters: int = 3) -> dict[str, float]:
    """Microseconds per iteration of each GPU kernel ``fn`` launches (on a CPU: of each op), from
    torch's profiler; the 16 longest."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        synchronize(device)
    times = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if gpu else event.self_cpu_time_total
        if us > 0:
            times[event.key[:100]] = us / iters
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:16])


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _profile(case: Case, record: dict, fn: Callable[[], object], device: torch.device) -> None:
    """Per-kernel times of ``fn`` and, for the low-rank linear on a modelled GPU, their roofline
    fractions (the row chunks as the launcher picks them on this device)."""
    record["kernel_us"] = kernel_us(fn, device)
    if case.op in roofline.LOW_RANK_OPS and device.type == "cuda":
        from igu_kernels.lora_linear import row_chunks

        roofline.annotate_kernels(record, lambda features: row_chunks(case.shape["tokens"], features, device))


def run(
    preset_name: str, device: torch.device, repeats: int, ops: set[str], profile: bool = False
) -> Iterator[list[dict]]:
    """The records of each case of ``ops`` (all if empty) in turn, one per backend; with
    ``profile``, the Triton backend's record also holds per-kernel times."""
    for index, case in enumerate(all_cases(PRESETS[preset_name], device, ops)):
        runners, errors = {}, {}
        for backend, build in case.backends.items():
            try:
                runners[backend] = build()
                runners[backend]()  # fail here, alone, rather than inside the timing loop
            except Exception as error:  # one backend failing (e.g. no compiler) must not stop the run
                errors[backend] = _error(error)
                runners.pop(backend, None)
        try:
            medians = interleaved_median_ms(runners, device, repeats=repeats)
        except Exception as error:  # e.g. out of memory in the rounds: the case fails, the run goes on
            medians = {}
            errors.update(dict.fromkeys(runners, _error(error)))
        records = []
        for backend in case.backends:
            ms = medians.get(backend)
            record = {
                "case": index,  # the records of one case: timed in the same rounds
                "op": case.op,
                "backend": backend,
                "shape": case.shape,
                "dtype": str(case.dtype).removeprefix("torch."),
                "device": device_name(device),
                "median_ms": ms,
                "gbps": case.bytes_moved / (ms * 1e-3) / 1e9 if ms and case.bytes_moved else None,
                "bytes_moved": case.bytes_moved,
            }
            if backend in errors:
                record["error"] = errors[backend]
            roofline.annotate(record)
            if profile and backend == "triton" and ms:
                try:
                    _profile(case, record, runners[backend], device)
                except Exception as error:  # the profiler is an extra: its failure costs the record nothing
                    record["profile_error"] = _error(error)
            records.append(record)
            result = f"{ms:.3f} ms" if ms else errors.get(backend)
            print(f"  {case.op:<15} {_shape(case.shape):<28} {backend:<17} {result}", file=sys.stderr)
        yield records


def memory(preset_name: str, device: torch.device) -> list[dict]:
    """Saved activation memory (and GPU peak) of the batched IG step for 1..16 nodes."""
    from bench.memory import node_memory_rows
    from bench.model_cases import small_llama_igu
    from igulora import causal_lm_row_loss

    igu, batch = small_llama_igu(PRESETS[preset_name], device)
    igu.train()
    return node_memory_rows(igu, batch, causal_lm_row_loss, [1, 2, 4, 8, 16], device)


def checkpoint_memory(preset_name: str, device: torch.device) -> list[dict]:
    """Saved / held activation memory (and GPU peak) of plain and scoring steps, per checkpointing."""
    from bench.memory import checkpointing_memory_rows
    from bench.model_cases import small_llama_igu
    from igulora import causal_lm_row_loss

    igu, batch = small_llama_igu(PRESETS[preset_name], device, ig_every=2)
    return checkpointing_memory_rows(igu, batch, causal_lm_row_loss, device)


def checkpoint_memory_table(rows: list[dict]) -> str:
    lines = [f"{'checkpointing':<14} {'step':<8} {'saved MB':>9} {'held MB':>8} {'peak MB':>8}"]
    for r in rows:
        peak = f"{r['peak_mb']:8.0f}" if "peak_mb" in r else f"{'':>8}"
        lines.append(
            f"{r['checkpointing']:<14} {r['step']:<8} {r['saved_mb']:9.2f} {r['held_mb']:8.2f} {peak}"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = [
        f"{'IG nodes':>8} {'rows':>5} {'saved MB':>9} {'same rows, plain MB':>20} {'adapter params MB':>18}"
    ]
    for r in rows:
        lines.append(
            f"{r['nodes']:>8} {r['rows']:>5} {r['saved_mb']:9.2f} {r['plain_same_rows_mb']:20.2f} "
            f"{r['adapter_params_mb']:18.3f}" + (f"  peak {r['peak_mb']:.0f} MB" if "peak_mb" in r else "")
        )
    return "\n".join(lines)


def _shape(s: dict) -> str:
    """A case's shape in a few characters: ``8192x4096>14336 r8/16`` (active / all ranks)."""
    if "tokens" not in s:
        return ",".join(f"{k}{v}" for k, v in s.items())
    ranks = f"{s['active']}/{s['r']}" if s.get("active", s["r"]) != s["r"] else f"{s['r']}"
    return f"{s['tokens']}x{s['in']}>{s['out']} r{ranks}"


def _case_times(records: list[dict]) -> dict[int, dict[str, float]]:
    """Medians per case and backend."""
    times: dict[int, dict[str, float]] = {}
    for r in records:
        if r["median_ms"]:
            times.setdefault(r["case"], {})[r["backend"]] = r["median_ms"]
    return times


def table(records: list[dict]) -> str:
    """One row per (case, backend): median, GB/s, speed-ups over eager and over PEFT-style eager
    LoRA, time over the base GEMM, and the roofline model (and fraction, on a modelled GPU)."""
    times = _case_times(records)
    sol_heads = "".join(f" {'SOL us ' + d:>15}" for d in roofline.TABLE_DEVICES)
    lines = [
        f"{'op':<15} {'shape':<28} {'dtype':<8} {'backend':<17} {'median ms':>10} {'GB/s':>7} {'x eager':>8}"
        f" {'x peft':>7} {'/ base':>7}{sol_heads} {'roofline':>8}"
    ]
    for r in records:
        ms, head = (
            r["median_ms"],
            f"{r['op']:<15} {_shape(r['shape']):<28} {r['dtype']:<8} {r['backend']:<17}",
        )
        if ms is None:
            lines.append(f"{head} {'failed':>10}  {r.get('error', '')}")
            continue
        case = times[r["case"]]
        eager = case.get("eager", case.get("eager_sequential"))
        peft, base = case.get("peft_eager"), case.get("base_gemm")
        speedup = f"{eager / ms:8.2f}" if eager else f"{'':>8}"
        over_peft = f"{peft / ms:7.2f}" if peft else f"{'':>7}"
        over_base = f"{ms / base:7.2f}" if base else f"{'':>7}"
        gbps = f"{r['gbps']:7.1f}" if r["gbps"] else f"{'':>7}"
        sol = r.get("sol_us", {})
        model = "".join(f" {sol[d]:15.1f}" if d in sol else f" {'':>15}" for d in roofline.TABLE_DEVICES)
        fraction = f" {r['roofline_fraction']:8.2f}" if "roofline_fraction" in r else ""
        lines.append(f"{head} {ms:10.3f} {gbps} {speedup} {over_peft} {over_base}{model}{fraction}")
    return "\n".join(lines)


def goals(records: list[dict]) -> list[str]:
    """The kernels issue's GPU goals, read off the records that measure them (GPU records: the
    interpreter's timings mean nothing)."""
    out, times = [], _case_times(records)
    for r in records:
        t = times.get(r["case"], {})
        if (
            r["op"] == "plain_lora"
            and r["backend"] == "triton"
            and {"triton", "base_gemm", "peft_eager"} <= t.keys()
        ):
            over_base, over_peft = t["triton"] / t["base_gemm"], t["peft_eager"] / t["triton"]
            out.append(
                f"plain_lora {_shape(r['shape'])} {r['dtype']}: triton / base GEMM {over_base:.2f} "
                f"(goal <= 1.15), peft_eager / triton {over_peft:.2f} (goal >= 1.3)"
            )
        if r["op"] == "ig_nodes" and r["backend"] == "triton_batched" and "eager_sequential" in t:
            ratio = t["eager_sequential"] / t["triton_batched"]
            out.append(f"ig_nodes: eager_sequential / triton_batched {ratio:.2f} (goal >= 2.5)")
    gbps = {r["backend"]: r["gbps"] for r in records if r["op"] in ("copy", "score_update") and r["gbps"]}
    if "triton" in gbps and "torch" in gbps:
        share = gbps["triton"] / gbps["torch"]
        out.append(f"score_update: triton {gbps['triton']:.0f} GB/s = {share:.2f} of copy (goal >= 0.7)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the records here (after every case)")
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ops", nargs="*", choices=[*OPS, *EXTRA_OPS], help="only these ops")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the triton backend")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = ("gpu" if device.type == "cuda" else "cpu") if args.preset == "auto" else args.preset
    ops = set(args.ops or [])
    command = " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    gpu = device.type == "cuda"
    data = {"meta": meta(command, device, preset=preset), "records": [], "goals": []}
    data |= {"memory": [], "checkpoint_memory": [], "launched_kernels": []}

    def save() -> None:
        data["table"] = table(data["records"])
        data["goals"] = goals(data["records"]) if gpu else []
        data["launched_kernels"] = launched() if gpu else []
        if args.json:
            write_json(args.json, data)

    timed = ops - set(EXTRA_OPS)
    if timed or not ops:
        for records in run(preset, device, args.repeats, timed, args.profile):
            data["records"] += records
            save()
    if not ops or "ig_memory" in ops:
        data["memory"] = memory(preset, device)
        save()
    if not ops or "checkpoint_memory" in ops:
        data["checkpoint_memory"] = checkpoint_memory(preset, device)
        save()
    report = "\n\n".join(
        part
        for part in (
            table(data["records"]),
            memory_table(data["memory"]) if data["memory"] else "",
            checkpoint_memory_table(data["checkpoint_memory"]) if data["checkpoint_memory"] else "",
            "\n".join(data["goals"]),
        )
        if part
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
