"""Memory of the batched IG step: bytes autograd saves for backward, per number of IG nodes,
and with and without gradient checkpointing.

Per-node copies of adapter weights would show up as saved memory growing by a parameter set per
node; activations grow with the rows. ``saved_bytes`` measures what a forward saves (the
activation memory of backward) deterministically, on any device; ``held_bytes`` what the
forward leaves allocated (CPU: the profiler's allocation records; GPU: the allocator); on a GPU
the peak allocated memory of forward + backward is reported too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def saved_bytes(forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct tensors autograd saves during ``forward()``, its output)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = (
                t.untyped_storage().nbytes()
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def reset_step(igu) -> None:
    """Forget a measured step: gradients, IG buffers and the batched row plan."""
    from igulora.ig import set_row_plan

    igu.zero_grad(set_to_none=True)
    set_row_plan(igu.model, None)
    for layer in igu.adapters.values():
        layer.ig_buffers = None


def node_memory_rows(igu, batch, row_loss_fn, nodes: list[int], device: torch.device) -> list[dict]:
    """Saved bytes (and GPU peak) of one batched IG training step for each node count."""
    from igulora.ig import batched_ig_loss, build_node_batch, mean_loss
    from igulora.quadrature import quadrature

    params = sum(p.numel() * p.element_size() for n, p in igu.named_parameters() if "lora_" in n)
    rows = []
    for n in nodes:
        node_batch = build_node_batch(
            batch, quadrature("riemann_middle", n), 0.25, torch.Generator().manual_seed(0)
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        saved, (loss, _) = saved_bytes(lambda nb=node_batch: batched_ig_loss(igu, row_loss_fn, nb))
        loss.backward()
        reset_step(igu)
        # The same stacked rows through a plain training forward: what the rows alone cost.
        plain, plain_loss = saved_bytes(lambda nb=node_batch: mean_loss(row_loss_fn)(igu, nb.batch))
        plain_loss.backward()
        reset_step(igu)
        row = {
            "nodes": n,
            "rows": len(node_batch.plan.row_scale),
            "saved_mb": saved / 2**20,
            "plain_same_rows_mb": plain / 2**20,
            "adapter_params_mb": params / 2**20,
        }
        if device.type == "cuda":
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
    return rows


def held_bytes(forward: Callable[[], torch.Tensor], device: torch.device) -> tuple[int, torch.Tensor]:
    """(bytes allocated by ``forward()`` and still held when it returns, its output)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        out = forward()
        return torch.cuda.memory_allocated(device) - before, out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    return sum(event.self_cpu_memory_usage for event in prof.events()), out


CHECKPOINTING = {"none": None, "non-reentrant": False, "reentrant": True}


def checkpointing_memory_rows(igu, batch, row_loss_fn, device: torch.device) -> list[dict]:
    """Saved and held bytes (and GPU peak) of a plain and a scoring step per checkpointing mode.

    ``igu`` wraps a Hugging Face model (``gradient_checkpointing_enable``) with ``ig_every`` 2.
    """
    rows = []
    for mode, reentrant in CHECKPOINTING.items():
        if reentrant is None:
            igu.gradient_checkpointing_disable()
        else:
            igu.gradient_checkpointing_enable({"use_reentrant": reentrant})
        igu.train()
        for step, kind in ((1, "plain"), (0, "scoring")):
            igu.step = step
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            saved, loss = saved_bytes(lambda: igu.training_loss(batch, row_loss_fn))
            loss.backward()
            reset_step(igu)
            held, loss = held_bytes(lambda: igu.training_loss(batch, row_loss_fn), device)
            loss.backward()
            reset_step(igu)
            row = {"checkpointing": mode, "step": kind, "saved_mb": saved / 2**20, "held_mb": held / 2**20}
            if device.type == "cuda":
                row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    igu.gradient_checkpointing_disable()
    return rows
