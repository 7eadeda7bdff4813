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


def config(term: float):
    # ig_steps="auto" with a tolerance no quadrature meets: the node count rises on a window of
    # all-reduced residuals, so every rank must take the same decisions as one process
    targets = ["query", "value", "intermediate.dense"]
    return short_run_config(
        STEPS, target_modules=targets, ig_steps="auto", ig_tolerance=1e-12, orth_reg_weight=term
    )


def train(rank: int, world: int, module_wrapper=None, term: float = 0.0) -> dict:
    """Train on this rank's slice of each global batch, with the orthogonality term at ``term``;
    returns masks, adapter weights (compacted to the active ranks where the term is off), the
    physical ranks and the IG node count after each step."""
    igu = get_igu_model(tiny_bert(torch.float64, seed=5), config(term))
    igu.train()
    module = module_wrapper(igu) if module_wrapper else igu
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.5)
    per_rank = GLOBAL_BATCH // world
    nodes = []
    for step in range(STEPS):
        batch = {
            k: v[rank * per_rank : (rank + 1) * per_rank]
            for k, v in token_batch(GLOBAL_BATCH, 6, seed=step).items()
        }
        igu.training_loss(batch, module=module).backward()
        optimizer.step()
        igu.update_and_allocate(step, optimizer=optimizer)  # compacts: DDP is rebuilt in place
        optimizer.zero_grad()
        nodes.append(igu.ig_nodes)
    weights = {n: p.detach().clone() for n, p in igu.named_parameters() if p.requires_grad}
    physical = {n: layer.r for n, layer in igu.adapters.items()}
    return {"pattern": igu.rank_pattern, "weights": weights, "physical_ranks": physical, "nodes": nodes}


def run(rank: int, world: int, port: int, out_dir: str, launcher: str, term: float) -> None:
    """Join a 2-process gloo group on loopback, as torchrun would, and train with DDP or Accelerate."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    if launcher == "accelerate":
        from accelerate import Accelerator, DistributedDataParallelKwargs

        accelerator = Accelerator(
            cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]
        )
        wrap = accelerator.prepare
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)

        def wrap(module):
            return DistributedDataParallel(module, broadcast_buffers=False)

    try:
        torch.save(train(rank, world, wrap, term), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
