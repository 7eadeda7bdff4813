"""Where a training step's time goes: torch's CPU profiler over the last steps of a run, split by
region (forward and loss, backward, optimizer, allocator) and by op.

``bench/whole_run.py --profile N`` profiles its last N steps after one warm-up step (the final
phase when N < tfinal), leaves those N + 1 steps out of its timings (the profiler's per-op cost
would weigh most on the method with the most ops) and records :func:`summary` per method;
:func:`table` sets methods side by side. Regions are exclusive: a library range nested in a region
(``igulora.model.ORTHOGONALITY_RANGE``, IGU-LoRA's orthogonality term) is its own row, and its
time and ops leave the enclosing region's. PEFT AdaLoRA's term has no range: it stays in its
forward.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from igulora.model import ORTHOGONALITY_RANGE

if TYPE_CHECKING:
    from torch.autograd.profiler_util import EventList, FunctionEvent

REGIONS = ("forward", "backward", "optimizer", "allocator")
RANGES = (*REGIONS, ORTHOGONALITY_RANGE)  # the rows of a profile, innermost wins
TOP = 15


def _range_of(event: FunctionEvent) -> str | None:
    """The innermost of RANGES that encloses ``event``."""
    parent = event.cpu_parent
    while parent is not None and parent.name not in RANGES:
        parent = parent.cpu_parent
    return None if parent is None else parent.name


def _dispatched(event: FunctionEvent) -> bool:
    """An ``aten::`` call not made by another ``aten::`` op."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::"))


def summary(events: EventList, steps: int) -> dict:
    """Per step: each range's exclusive wall ms, the ops dispatched in it (``aten::`` calls not made
    by another ``aten::`` op, counted to their innermost range: the per-call overhead a CPU pays),
    and the ``TOP`` ops by self CPU ms (the profiler's own ranges left out)."""
    total: Counter[str] = Counter()
    nested: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    for event in events:
        if event.name in RANGES:
            total[event.name] += event.cpu_time_total / 1e3
            outer = _range_of(event)
            if outer is not None:
                nested[outer] += event.cpu_time_total / 1e3
        elif _dispatched(event):
            owner = _range_of(event)
            if owner is not None:
                ops[owner] += 1
    top = [e for e in events.key_averages() if not e.is_user_annotation and e.key not in RANGES]
    top = sorted(top, key=lambda e: -e.self_cpu_time_total)[:TOP]
    return {
        "steps": steps,
        "region_ms": {name: (total[name] - nested[name]) / steps for name in RANGES if name in total},
        "ops_per_step": {name: ops[name] / steps for name in RANGES if name in ops},
        "top_ops": [
            {"op": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1e3 / steps}
            for e in top
        ],
    }


def table(profiles: dict[str, dict]) -> str:
    """Markdown: a row per range, one "ms / ops" cell per method (per profiled step)."""
    head = ["range"] + [f"{label}: ms / ops" for label in profiles]
    rows = [head, ["---"] + ["---:"] * len(profiles)]
    for name in RANGES:
        if not any(name in p["region_ms"] for p in profiles.values()):
            continue
        cells = [name]
        for p in profiles.values():
            ms, calls = p["region_ms"].get(name), p["ops_per_step"].get(name, 0)
            cells.append("" if ms is None else f"{ms:.1f} / {calls:.0f}")
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
