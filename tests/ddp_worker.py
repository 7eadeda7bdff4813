"""One rank of the 2-process DDP test (spawned by tests/test_distributed.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from conftest import short_run_config, tiny_bert, token_batch
from torch.nn.parallel import DistributedDataParallel

from igulora import get_igu_model

STEPS = 12  # ten scoring steps: one ig_steps="auto" window (node_budget.WINDOW = 8)
GLOBAL_BATCH = 8


def config(orth: dict):
    # ig_steps="auto" with a tolerance no quadrature meets: the node count rises on a window of
    # all-reduced residuals, so every rank must take the same decisions as one process
    targets = ["query", "value", "intermediate.dense"]
    return short_run_config(STEPS, target_modules=targets, ig_steps="auto", ig_tolerance=1e-12, **orth)


def train(rank: int, world: int, module_wrapper=None, orth: dict | None = None, accelerator=None) -> dict:
    """Train on this rank's slice of each global batch, with the orthogonality term of ``orth``
    (config overrides; none: no term); returns masks, adapter weights (compacted to the active
    ranks where compaction runs), the
    physical ranks and the IG node count after each step.

    With ``accelerator``: its ``gradient_accumulation_steps`` micro-batches per slice under
    ``accumulate``, the optimizer prepared too, and ``igu.attach(optimizer)`` allocating instead
    of update_and_allocate calls. Equal micro-batches of per-micro-batch mean losses, each divided
    by their number (``accelerator.backward``), add up to the slice's mean loss, as IG does."""
    igu = get_igu_model(tiny_bert(torch.float64, seed=5), config(orth or {}))
    igu.train()
    module = module_wrapper(igu) if module_wrapper else igu
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.5)
    if accelerator is not None:
        module, optimizer = accelerator.prepare(igu, optimizer)
        igu.attach(optimizer)
    per_rank = GLOBAL_BATCH // world
    nodes = []
    for step in range(STEPS):
        batch = {
            k: v[rank * per_rank : (rank + 1) * per_rank]
            for k, v in token_batch(GLOBAL_BATCH, 6, seed=step).items()
        }
        if accelerator is None:
            igu.training_loss(batch, module=module).backward()
            optimizer.step()
            igu.update_and_allocate(step, optimizer=optimizer)  # compacts: DDP is rebuilt in place
            optimizer.zero_grad()
        else:
            micro = per_rank // accelerator.gradient_accumulation_steps
            for start in range(0, per_rank, micro):
                micro_batch = {k: v[start : start + micro] for k, v in batch.items()}
                with accelerator.accumulate(module):
                    accelerator.backward(igu.training_loss(micro_batch, module=module))
                    optimizer.step()  # on the last micro-batch only: the hook allocates then
                    optimizer.zero_grad()
            assert igu.step == step + 1, (igu.step, step)  # one allocation per optimizer step
        nodes.append(igu.ig_nodes)
    weights = {n: p.detach().clone() for n, p in igu.named_parameters() if p.requires_grad}
    physical = {n: layer.r for n, layer in igu.adapters.items()}
    return {"pattern": igu.rank_pattern, "weights": weights, "physical_ranks": physical, "nodes": nodes}


def run(rank: int, world: int, port: int, out_dir: str, launcher: str, orth: dict) -> None:
    """Join a 2-process gloo group on loopback, as torchrun would, and train with DDP, Accelerate's
    prepared model (``accelerate``) or Accelerate's accumulation loop with ``igu.attach``
    (``accelerate-hook``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    if launcher.startswith("accelerate"):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        accelerator = Accelerator(
            cpu=True,
            gradient_accumulation_steps=2 if launcher == "accelerate-hook" else 1,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)

    def wrap(module):
        return DistributedDataParallel(module, broadcast_buffers=False)

    try:
        if launcher == "accelerate-hook":
            result = train(rank, world, orth=orth, accelerator=accelerator)
        else:  # the model wrapped; the loop calls update_and_allocate
            result = train(rank, world, accelerator.prepare if launcher == "accelerate" else wrap, orth)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
