"""Memory of the batched IG step: bytes autograd saves for backward, per number of IG nodes.

Per-node copies of adapter weights would show up as saved memory growing by a parameter set per
node; activations grow with the rows. ``saved_bytes`` measures what a forward saves (the
activation memory of backward) deterministically, on any device; on a GPU the peak allocated
memory is reported too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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


def node_memory_rows(igu, batch, row_loss_fn, nodes: list[int], device: torch.device) -> list[dict]:
    """Saved bytes (and GPU peak) of one batched IG training step for each node count."""
    from igulora.ig import batched_ig_loss, build_node_batch, mean_loss, set_row_plan
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
        set_row_plan(igu, None)
        # The same stacked rows through a plain training forward: what the rows alone cost.
        plain, plain_loss = saved_bytes(lambda nb=node_batch: mean_loss(row_loss_fn)(igu, nb.batch))
        plain_loss.backward()
        igu.zero_grad()
        for layer in igu.adapters.values():
            layer.ig_buffers = None
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
