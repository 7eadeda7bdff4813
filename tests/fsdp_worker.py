"""One rank of the 2-process FSDP2 test (spawned by tests/test_distributed.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_llama, token_batch

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model

STEPS = 8
GLOBAL_BATCH = 8


def config(**overrides) -> IGULoraConfig:
    # ig_fraction 1: every rank's IG rows are its own training rows, as in the 1-process run
    base = dict(init_r=4, target_r=2, total_step=STEPS, tinit=2, tfinal=2, ig_every=1, ig_fraction=1.0)
    return IGULoraConfig(**{**base, **overrides})


def train(rank: int, world: int, shard: bool, save_dir: str | None = None, **overrides) -> dict:
    """Train a tiny Llama on this rank's slice of each global batch; masks, full weights and the
    compaction warnings raised (none with the orthogonality term over every rank: it keeps pruned
    ranks masked before FSDP2 would; otherwise FSDP2's own warning)."""
    from torch.distributed.fsdp import fully_shard

    igu = get_igu_model(tiny_llama(torch.float64, seed=5), config(**overrides))
    if shard:
        for layer in igu.model.model.layers:
            fully_shard(layer)
        fully_shard(igu)
    igu.train()
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        for step in range(STEPS):
            # No padding: every rank averages over as many tokens, so the mean of the ranks' token
            # means is the global token mean (as with DDP).
            batch = token_batch(GLOBAL_BATCH, 6, seed=step)
            batch = {
                k: batch[k][rank * per_rank : (rank + 1) * per_rank] for k in ("input_ids", "attention_mask")
            }
            igu.training_loss(batch, causal_lm_row_loss).backward()
            optimizer.step()
            igu.update_and_allocate(step, optimizer=optimizer)
            optimizer.zero_grad()
    if save_dir is not None:
        igu.save_pretrained(save_dir)
    weights = {}
    for name, p in igu.named_parameters():
        if p.requires_grad:
            weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    messages = [str(w.message) for w in raised if "not compacted" in str(w.message)]
    return {"pattern": igu.rank_pattern, "weights": weights, "compaction_warnings": messages}


def run(
    rank: int, world: int, port: int, out_dir: str, head: bool = False, overrides: dict | None = None
) -> None:
    """Join a 2-process gloo group on loopback and train under FSDP2 (config ``overrides``); with
    ``head``, also train lm_head (modules_to_save) and record the error that must come."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if head:
            try:
                train(rank, world, shard=True, modules_to_save=["lm_head"])
            except NotImplementedError as error:
                Path(f"{out_dir}/rank{rank}.err").write_text(str(error))
        else:
            result = train(rank, world, shard=True, save_dir=f"{out_dir}/adapter", **(overrides or {}))
            torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
