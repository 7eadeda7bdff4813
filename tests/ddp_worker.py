"""One rank of the 2-process DDP test (spawned by tests/test_distributed.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import short_run_config, tiny_bert, token_batch
from torch.nn.parallel import DistributedDataParallel

from igulora import get_igu_model

STEPS = 8
GLOBAL_BATCH = 8


def config():
    return short_run_config(STEPS, target_modules=["query", "value", "intermediate.dense"])


def train(rank: int, world: int, module_wrapper=None) -> dict:
    """Train on this rank's slice of each global batch; returns masks and adapter weights."""
    igu = get_igu_model(tiny_bert(torch.float64, seed=5), config())
    igu.train()
    module = module_wrapper(igu) if module_wrapper else igu
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.5)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = {
            k: v[rank * per_rank : (rank + 1) * per_rank]
            for k, v in token_batch(GLOBAL_BATCH, 6, seed=step).items()
        }
        igu.training_loss(batch, module=module).backward()
        optimizer.step()
        igu.update_and_allocate(step)
        optimizer.zero_grad()
    weights = {n: p.detach().clone() for n, p in igu.named_parameters() if p.requires_grad}
    return {"pattern": igu.rank_pattern, "weights": weights}


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train(rank, world, lambda m: DistributedDataParallel(m, broadcast_buffers=False))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
