"""DDP on 2 gloo processes: IG is all-reduced, so every rank keeps the masks of one big batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import run, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TERM = {"orth_reg_weight": 0.25, "orth_reg_ranks": "all"}  # AdaLoRA's term, over every rank


@pytest.fixture(autouse=True)
def _cpp_ops_built() -> None:
    """Build the C++ ops here, before any rank starts: the ranks then only load them."""
    from igu_kernels import cpp

    cpp.load()


@pytest.mark.parametrize(
    "launcher, orth",
    [
        ("ddp", {}),
        ("accelerate", {}),
        ("accelerate-hook", {}),
        ("ddp", TERM),
        ("ddp", {**TERM, "orth_reg_ranks": "live"}),
    ],
    ids=["ddp", "accelerate", "accelerate-hook", "ddp-orth", "ddp-orth-live"],
)
def test_two_process_run_matches_a_single_process_run(tmp_path, launcher, orth):
    """Compacted without the orthogonality term or with it over the kept ranks; with it over
    every rank (the default) masked, the term's gradient reaching every rank outside DDP's
    forward. ``accelerate-hook``: Accelerate's accumulation of 2 micro-batches per rank and
    ``igu.attach(optimizer)`` instead of update_and_allocate calls."""
    if launcher.startswith("accelerate"):
        pytest.importorskip("accelerate")
    mp.spawn(run, args=(2, _free_port(), str(tmp_path), launcher, orth), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train(rank=0, world=1, orth=orth)
    kept = sum(map(sum, single["pattern"].values()))
    assert kept == 2 * len(single["pattern"]) < 4 * len(single["pattern"])
    if orth and orth.get("orth_reg_ranks", "all") == "all":
        assert set(single["physical_ranks"].values()) == {4}  # masked: the term reaches every rank
    else:
        assert single["physical_ranks"] == {n: sum(m) for n, m in single["pattern"].items()}  # compacted
        assert 0 in single["physical_ranks"].values()  # an empty adapter, which DDP must leave out
    assert single["nodes"][0] < single["nodes"][-1]  # ig_steps="auto" raised the node count
    for result in ranks:
        assert result["nodes"] == single["nodes"]
        assert result["pattern"] == single["pattern"]
        assert result["physical_ranks"] == single["physical_ranks"]
        for name, value in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{"orth_reg_ranks": "all"}, {"orth_reg_ranks": "live"}, {"orth_reg_weight": 0.0}],
    ids=["term-all", "term-live", "no-term"],
)
def test_fsdp2_two_process_run_matches_a_single_process_run(tmp_path, overrides):
    """Masked in every case: with the orthogonality term over every rank the term keeps pruned
    ranks (silently); over the kept ranks (sharded A and B masked) or without it, FSDP2's sharding
    does, and says so once per rank."""
    pytest.importorskip("torch.distributed.fsdp")
    import fsdp_worker
    from safetensors.torch import load_file

    mp.spawn(fsdp_worker.run, args=(2, _free_port(), str(tmp_path), False, overrides), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = fsdp_worker.train(
        rank=0, world=1, shard=False, save_dir=str(tmp_path / "single"), compact=False, **overrides
    )
    kept = sum(map(sum, single["pattern"].values()))
    assert kept == 2 * len(single["pattern"])
    assert single["compaction_warnings"] == []
    for result in ranks:
        if overrides != {"orth_reg_ranks": "all"}:
            assert len(result["compaction_warnings"]) == 1 and "FSDP2" in result["compaction_warnings"][0]
        else:
            assert result["compaction_warnings"] == []  # the term blocks compaction before FSDP2 does
        assert result["pattern"] == single["pattern"]
        assert result["weights"].keys() == single["weights"].keys()
        for name, value in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-9, atol=1e-12, msg=name)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")  # written once, by rank 0
    expected = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_fsdp2_with_a_trained_head_is_a_clear_error(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    import fsdp_worker

    mp.spawn(fsdp_worker.run, args=(2, _free_port(), str(tmp_path), True), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert "['model.lm_head.weight']" in message and "FSDP2" in message
