"""Run every benchmark case side by side and write JSON records.

    python bench/run.py --json bench/results/cpu.json            # preset by device
    python bench/run.py --preset tiny --json /tmp/smoke.json      # seconds: checks the harness

Records: {op, backend, shape, dtype, median_ms, gbps, device}. The table gives each backend's
speed-up over the eager reference of the same case and, for the low-rank linear, the time
relative to the frozen base GEMM alone, timed in the same rounds. Triton is timed only on a
GPU; interpreter timings are never reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import roofline  # noqa: E402
from bench.cases import PRESETS, all_cases  # noqa: E402
from bench.timing import interleaved_median_ms  # noqa: E402
from igu_kernels.audit import launched  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(preset_name: str, device: torch.device, repeats: int, ops: set[str] | None) -> list[dict]:
    preset = PRESETS[preset_name]
    records = []
    for case in all_cases(preset, device):
        if ops and case.op not in ops:
            continue
        runners, errors = {}, {}
        for backend, build in case.backends.items():
            try:
                runners[backend] = build()
                runners[backend]()  # fail here, alone, rather than inside the timing loop
            except Exception as error:  # one backend failing (e.g. no compiler) must not stop the run
                errors[backend] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                runners.pop(backend, None)
        medians = interleaved_median_ms(runners, device, repeats=repeats)
        for backend in case.backends:
            ms = medians.get(backend)
            record = {
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
            records.append(record)
            print(f"  {case.op:<15} {backend:<17} {ms or errors.get(backend)}", file=sys.stderr)
    return records


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


def table(records: list[dict]) -> str:
    """One row per (case, backend): median, GB/s, speed-ups over eager and over PEFT-style eager
    LoRA, time over the base GEMM, and the roofline model (and fraction, on a modelled GPU)."""

    def case_of(r: dict) -> tuple:
        return r["op"], json.dumps(r["shape"], sort_keys=True)

    times: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["median_ms"]:
            times.setdefault(case_of(r), {})[r["backend"]] = r["median_ms"]
    header = f"{'op':<15} {'r':>3} {'backend':<17} {'median ms':>10} {'GB/s':>7} {'x eager':>8} {'x peft':>7}"
    lines = [header + f" {'/ base':>7} {'SOL us H200':>11} {'SOL us A100':>11} {'roofline':>8}"]
    for r in records:
        ms, rank = r["median_ms"], r["shape"].get("r", "")
        if ms is None:
            lines.append(f"{r['op']:<15} {rank:>3} {r['backend']:<17} {'failed':>10}  {r['error']}")
            continue
        case = times[case_of(r)]
        eager, peft, base = (
            case.get("eager", case.get("eager_sequential")),
            case.get("peft_eager"),
            case.get("base_gemm"),
        )
        speedup = f"{eager / ms:8.2f}" if eager else f"{'':>8}"
        over_peft = f"{peft / ms:7.2f}" if peft else f"{'':>7}"
        over_base = f"{ms / base:7.2f}" if base else f"{'':>7}"
        gbps = f"{r['gbps']:7.1f}" if r["gbps"] else f"{'':>7}"
        sol = r.get("sol_us", {})
        model = "".join(f" {sol[d]:11.1f}" if d in sol else f" {'':>11}" for d in ("H200", "A100"))
        fraction = f" {r['roofline_fraction']:8.2f}" if "roofline_fraction" in r else ""
        lines.append(
            f"{r['op']:<15} {rank:>3} {r['backend']:<17} {ms:10.3f} {gbps} {speedup} {over_peft} {over_base}"
            + model
            + fraction
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ops", nargs="*", help="only these ops")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = ("gpu" if device.type == "cuda" else "cpu") if args.preset == "auto" else args.preset
    records = run(preset, device, args.repeats, set(args.ops or []))
    memory_rows = memory(preset, device) if not args.ops or "ig_memory" in args.ops else []
    wanted = not args.ops or "checkpoint_memory" in args.ops
    checkpoint_rows = checkpoint_memory(preset, device) if wanted else []
    report = table(records) + ("\n\n" + memory_table(memory_rows) if memory_rows else "")
    report += "\n\n" + checkpoint_memory_table(checkpoint_rows) if checkpoint_rows else ""
    print(report)
    if args.json:
        meta = {
            "command": " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.date.today().isoformat(),
            "device": device_name(device),
            "preset": preset,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "meta": meta,
            "records": records,
            "memory": memory_rows,
            "checkpoint_memory": checkpoint_rows,
            "table": report,
            "launched_kernels": launched() if device.type == "cuda" else [],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
