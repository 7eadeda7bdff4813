"""Host syncs and CPU time of one IGU-LoRA training step (issue #32: no host sync per adapter).

    python -m bench.host_syncs --json /tmp/after.jsonl              # one run, appended
    python -m bench.host_syncs --compare /tmp/before.jsonl /tmp/after.jsonl --json RESULT.json

Two models, eager backend: pretrained MiniLM-L6 (its 36 encoder linears; 16 sequences x 64
tokens) and a Llama-shaped decoder built from a config (hidden 256, 4 layers, all 7 projections:
28 adapters; 4 x 64 tokens). A step is one iteration of ``igulora finetune``'s loop: training
loss, backward, ``finite_step``, AdamW (fused), ``update_and_allocate``, the metrics row. With the
defaults ``ig_every=2`` and ``delta_t=1``, scoring (batched IG) and plain steps alternate, and
every step of the budget phase reallocates: each model runs a phase before ``tinit`` and then
one in the budget phase. Per model, phase and step kind: the ops that read a device value back
to the host in one step (:func:`count_syncs`) and the median ms of a step over ``--repeats``
steps after 2 warm-up pairs.

``--compare`` pairs runs of two versions of the code, made in turns (before, after, before, ...),
round by round: the ratio after/before of each round's medians, and its median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.case import PRESETS  # noqa: E402
from bench.model_cases import MINILM_ADAPTERS, pretrained_minilm, small_llama  # noqa: E402
from igulora import (  # noqa: E402
    IGULoraConfig,
    causal_lm_row_loss,
    get_igu_model,
    sequence_classification_row_loss,
)
from igulora.metrics import allocation_metrics  # noqa: E402

# aten ops that make the host wait for the device: a value read (item, bool, int, float), an
# output whose size depends on the data, or a comparison returned as a Python bool.
READ_BACK_OPS = frozenset(
    {
        "_local_scalar_dense",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "unique_dim_consecutive",
    }
)
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # a bool index: nonzero
HOST_COPIES = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu)


def _read_back(func, args: tuple, kwargs: dict) -> str | None:
    """The name under which an aten call is counted, or None if it does not wait for the device."""
    name = func.overloadpacket.__name__
    if name in READ_BACK_OPS:
        return name
    if name in INDEX_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return f"{name} (bool index)"
    if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return name
    return None


class _ReadBacks(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _read_back(func, args, kwargs)
        if name:
            self.counts[name] += 1
        return func(*args, **kwargs)


class _HostCopies(TorchFunctionMode):
    """``tolist``, ``numpy``, ``cpu``: device-to-host copies, which do nothing a dispatch mode
    sees when the tensor is on the CPU already."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.counts[f"Tensor.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Count, by op, the reads back to the host in the block. Meant for the CPU, where every
    tensor counts as if it were on an accelerator (tensors kept on the host too). Not seen:
    ``.to("cpu")``, ``copy_`` into host memory, and host-to-device copies (a blocking one waits
    for the stream on a GPU)."""
    counts: Counter = Counter()
    with _HostCopies(counts), _ReadBacks(counts):
        yield counts


def training_step(igu, optimizer: torch.optim.Optimizer, batch: dict, row_loss_fn, step: int) -> None:
    """One iteration of ``igulora finetune``'s loop (igulora/finetune.py), learning-rate
    schedule and logging file aside."""
    loss = igu.training_loss(batch, row_loss_fn)
    loss.backward()
    if igu.finite_step(loss):
        optimizer.step()
    igu.update_and_allocate(step, optimizer=optimizer)
    optimizer.zero_grad()
    allocation_metrics(igu, step, float(igu.last_loss))


def fused_adamw(igu) -> torch.optim.Optimizer:
    """AdamW without a host read per parameter on the CPU: the for-loop AdamW reads each
    parameter's step count, a CPU tensor also on a GPU (where the read is no sync)."""
    return torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-4, fused=True)


def _config(tinit: int, **overrides) -> IGULoraConfig:
    """Defaults (``ig_every=2``: scoring and plain steps alternate; ``delta_t=1``: every step of
    the budget phase reallocates) with a budget phase after ``tinit`` steps."""
    return IGULoraConfig(total_step=tinit + 100, tinit=tinit, **overrides)


def minilm_case(tinit: int):
    torch.manual_seed(0)
    model = pretrained_minilm()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
        "attention_mask": torch.ones(16, 64, dtype=torch.long),
        "labels": torch.randint(0, 2, (16,), generator=g),
    }
    return get_igu_model(model, _config(tinit, **MINILM_ADAPTERS)), batch, sequence_classification_row_loss


def llama_case(tinit: int):
    model = small_llama(dataclasses.replace(PRESETS["cpu"], model_layers=4), torch.device("cpu"))
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    igu = get_igu_model(model, _config(tinit, target_modules=projections))
    batch = {"input_ids": torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))}
    return igu, batch, causal_lm_row_loss


CASES: dict[str, Callable] = {"minilm": minilm_case, "llama_h256_l4": llama_case}
KINDS = ("scoring", "plain")  # even and odd steps under ig_every=2


def measure(case: str, repeats: int) -> list[dict]:
    """Sync counts and median step ms of each step kind of ``case``: scoring and plain steps
    before ``tinit``, then in the budget phase (allocating)."""
    phase = 2 * (2 + 1 + repeats)  # steps of each phase: warm-up, counted and timed pairs
    igu, batch, row_loss_fn = CASES[case](tinit=phase - 1)
    igu.train()
    optimizer = fused_adamw(igu)
    counts: dict[str, Counter] = {}
    times: dict[str, list[float]] = defaultdict(list)
    for step in range(2 * phase):
        kind = f"{KINDS[step % 2]}{', allocating' if step >= phase else ''}"
        if step % phase < 4:
            training_step(igu, optimizer, batch, row_loss_fn, step)
        elif step % phase < 6:
            with count_syncs() as counts[kind]:
                training_step(igu, optimizer, batch, row_loss_fn, step)
        else:
            start = time.perf_counter()
            training_step(igu, optimizer, batch, row_loss_fn, step)
            times[kind].append((time.perf_counter() - start) * 1e3)
    return [
        {
            "case": case,
            "adapters": len(igu.adapters),
            "kind": kind,
            "syncs": sum(counts[kind].values()),
            "syncs_by_op": dict(counts[kind]),
            "median_ms": statistics.median(times[kind]),
            "ms": times[kind],
        }
        for kind in counts
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _runs(records: list[dict], case: str, kind: str) -> list[dict]:
    return [r for r in records if r["case"] == case and r["kind"] == kind]


def compare(before: list[dict], after: list[dict]) -> list[dict]:
    """Rows of the two versions side by side, per case and kind, rounds paired in order."""
    rows = []
    for case in dict.fromkeys(r["case"] for r in after):
        for kind in dict.fromkeys(r["kind"] for r in after if r["case"] == case):
            b, a = _runs(before, case, kind), _runs(after, case, kind)
            ratios = [x["median_ms"] / y["median_ms"] for x, y in zip(a, b)]
            rows.append(
                {
                    "case": case,
                    "adapters": a[0]["adapters"],
                    "kind": kind,
                    "syncs_before": b[0]["syncs"],
                    "syncs_after": a[0]["syncs"],
                    "syncs_after_by_op": a[0]["syncs_by_op"],
                    "ms_before": [r["median_ms"] for r in b],
                    "ms_after": [r["median_ms"] for r in a],
                    "ratio_after_before": ratios,
                    "median_ratio": statistics.median(ratios),
                }
            )
    return rows


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--json", help="measure: append records (JSON lines); compare: write the table")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two JSON-lines files")
    args = parser.parse_args(argv)
    os.environ["IGULORA_BACKEND"] = "eager"
    if args.compare:
        rows = compare(*map(_read_jsonl, args.compare))
        for r in rows:
            head = f"{r['case']:>14} {r['adapters']:>3} adapters {r['kind']:>19}"
            syncs = f"syncs {r['syncs_before']:>4} -> {r['syncs_after']:>3}"
            rounds = len(r["ratio_after_before"])
            print(f"{head}: {syncs}, time after/before {r['median_ratio']:.3f} ({rounds} rounds)")
        if args.json:
            record = {"date": datetime.date.today().isoformat(), "machine": machine(), "rows": rows}
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        return
    for case in args.cases.split(","):
        for record in measure(case, args.repeats):
            print(
                f"{case:>14} {record['adapters']:>3} adapters {record['kind']:>19}: "
                f"{record['syncs']:>4} syncs, {record['median_ms']:8.1f} ms"
            )
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
