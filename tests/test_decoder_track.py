"""bench/quality/decoder.py and causal.py on a tiny Llama and a character tokenizer: RTE's framing,
PEFT EVA's rank redistribution at the budget, one cell's record in glue.py's format, and the plan
(lr search on SST-2 seed 0, every seed at the selected lr, RTE at SST-2's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "quality")]
pytest.importorskip("peft")
import causal  # noqa: E402
import decoder  # noqa: E402
from conftest import char_tokenizer, tiny_llama  # noqa: E402
from runs import run_key  # noqa: E402

from bench import whole_run  # noqa: E402
from igulora.data import Example  # noqa: E402

PAIRS = [("a cat sleeps", "a cat rests", 0), ("rain falls", "it is dry", 1)] * 8


def backbone():
    return tiny_llama(vocab_size=61), char_tokenizer()


def rte_examples() -> list[Example]:
    return [Example(text, pair, label) for text, pair, label in PAIRS]


def test_a_pair_reads_as_premise_and_hypothesis_answered_yes_or_no():
    _, tokenizer = backbone()
    frame = causal.FRAMES["rte"]
    examples = rte_examples()[:2]
    assert "a cat sleeps" in frame.prompt(examples[0]) and "a cat rests" in frame.prompt(examples[0])
    batches = causal.ChatBatches(examples, tokenizer, 2, 0, frame)
    batch = batches.encode(examples)
    for row, answer in enumerate(("yes", "no")):  # 0 = entailment
        answered = batch["labels"][row] != -100
        assert (
            batch["input_ids"][row][answered].tolist()
            == tokenizer(answer, add_special_tokens=False).input_ids
        )


def test_eva_redistributes_the_uniform_budget_from_the_inputs_variance():
    model, tokenizer = backbone()
    batches = causal.ChatBatches(rte_examples(), tokenizer, 4, 0, causal.FRAMES["rte"])
    module, loss, _ = causal.eva_build(model, 2.0, batches)
    ranks = {n: p.shape[0] for n, p in module.named_parameters() if n.endswith("lora_A.default.weight")}
    assert len(ranks) == 14  # 2 layers x 7 projections
    assert sum(ranks.values()) == 2 * len(ranks) and max(ranks.values()) <= 2 * causal.INIT_MULTIPLE
    for name, r in ranks.items():  # EVA's A: the top right-singular vectors of the layer's inputs
        A = module.get_parameter(name).detach()
        if r:
            torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-4, rtol=0, msg=name)
    assert torch.isfinite(loss(batches(0)))


@pytest.mark.parametrize("method", ["igu", "eva"])
def test_a_cell_records_in_glue_format_and_keeps_its_budget(method, monkeypatch):
    examples = rte_examples()
    monkeypatch.setattr(whole_run, "split_train", lambda task: (examples, examples[:4], examples[4:10]))
    one = {**decoder.spec("rte", method, 1e-2, 0), "steps": 20, "batch": 4, "train_examples": 16}
    one |= {"val_examples": 4, "dev_examples": 6}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = decoder.train_one(one, load=backbone)
    finally:
        torch.set_num_threads(threads)
    assert run_key(record) == run_key(one)  # IGU-LoRA: the knobs it ran with are the spec's
    assert {"val_accuracy", "dev_accuracy"} <= set(record) and 0 <= record["dev_accuracy"] <= 1
    assert record["kept_triplets"] == 2 * record["adapted_linears"] == 28
    json.dumps(record)


def test_the_plan_searches_sst2_then_runs_every_seed_at_the_selected_lr(tmp_path):
    methods = ["lora", "igu"]
    search = decoder.plan([], "sst2", methods)
    assert [(s["method"], s["lr"], s["seed"]) for s in search if s["lr"]] == [
        (m, lr, 0) for m in methods for lr in decoder.LR_GRID
    ]
    assert all(s["lr"] is None for s in decoder.plan([], "rte", methods))  # RTE waits for SST-2's
    path = tmp_path / "runs.jsonl"
    with pytest.raises(SystemExit, match="lr search of sst2"):
        decoder.sweep("rte", methods, path)
    done = [  # the larger lr wins for LoRA, the smaller for IGU-LoRA
        {**s, "val_accuracy": 0.5 + (s["lr"] == max(decoder.LR_GRID)) * (s["method"] == "lora") * 0.1}
        for s in search
        if s["lr"]
    ]
    lrs = {s["method"]: s["lr"] for s in decoder.plan(done, "rte", methods)}
    assert lrs == {"lora": max(decoder.LR_GRID), "igu": min(decoder.LR_GRID)}
    seeds = [s for s in decoder.plan(done, "sst2", methods) if s["seed"]]
    assert {(s["method"], s["lr"]) for s in seeds} == set(lrs.items()) and len(seeds) == 4
    assert "sst2: 4 runs left" in decoder.estimate([{**r, "wall_s": 10.0} for r in done], methods)


def fake_runs(task: str) -> list[dict]:
    """Decoder records of every method on a 2-layer model: the lr search (seed 0) and 3 seeds each,
    AdaLoRA + term the best anchor, IGU-LoRA 0.02 above LoRA on every seed, and IGU-LoRA's ranks
    moved from q and k to the MLP."""
    attention, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    names = [f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in attention]
    names += [f"model.layers.{i}.mlp.{k}" for i in (0, 1) for k in mlp]
    moved = {n: 0 for n in names if n.endswith(("q_proj", "k_proj"))}
    moved |= {n: 4 for n in names if ".0.mlp." in n or n.endswith("1.mlp.down_proj")}
    dev = {"igu": 0.80, "adalora-orth": 0.81, "adalora": 0.78, "lora": 0.78, "eva": 0.79}
    out = []
    for method, base in dev.items():
        ranks = dict.fromkeys(names, 2) | (moved if method == "igu" else {})
        for seed in decoder.SEEDS:
            for lr in decoder.LR_GRID if seed == 0 else (min(decoder.LR_GRID),):
                record = {**decoder.spec(task, method, lr, seed), "active_ranks": ranks, "wall_s": 60.0}
                record["val_accuracy"] = 0.7 + (lr == min(decoder.LR_GRID)) * 0.1
                out.append(record | {"dev_accuracy": base + seed / 100})
    return out


def test_the_report_compares_with_the_best_anchor_and_maps_the_ranks(tmp_path):
    text = "\n".join(decoder.report(fake_runs("sst2"), tmp_path))
    accuracy, allocation = text.split("![ranks]")

    def rows(part: str) -> dict[str, list[str]]:
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()]
        return {row[0]: row[1:] for row in cells if len(row) > 1 and row[0] not in ("method", "---")}

    search = rows(accuracy.split("(seed 0;")[0])
    assert search["LoRA (PEFT, r = 2)"] == ["**0.800 / 0.780**", "0.700 / 0.780"]  # the smaller lr wins
    table = rows(accuracy.split("(seed 0;")[1])
    assert table["IGU-LoRA (defaults)"][:3] == ["0.001", "0.800, 0.810, 0.820", "0.8100"]
    assert table["AdaLoRA (PEFT, with term) (best anchor)"][3:5] == ["-0.0100 +- 0.0000", "0 / 3"]
    assert table["LoRA (PEFT, r = 2)"][3:5] == ["+0.0200 +- 0.0000", "3 / 3"]
    assert (tmp_path / "decoder-sst2-ranks.png").stat().st_size > 0
    assert "same seed (seeds 0, 1, 2): 0.71, 0.71, 0.71" in allocation  # 20 of AdaLoRA's 28 ranks
    assert "seed to seed: IGU-LoRA 1.00, AdaLoRA 1.00" in allocation
    per_kind = rows(allocation)
    assert per_kind["IGU-LoRA (defaults)"] == ["8", "6", "0", "4", "0", "6", "4", "4"]  # + 4 adapters at 0
    assert per_kind["AdaLoRA (PEFT, with term)"] == ["4"] * 7 + ["0"]
    assert "over the 2 layers" in allocation


def test_the_summary_row_pairs_igu_lora_with_the_best_anchor_once_every_method_has_its_seeds():
    runs = fake_runs("sst2") + [r for r in fake_runs("rte") if r["method"] != "eva" or r["seed"] < 2]
    lines = decoder.summary(runs)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("| ")]
    assert rows == [
        ["sst2", "SmolLM2-135M-Instruct", "2", "0.810", "0.820*", "0.790", "0.790", "0.800",
         "-0.0100 +- 0.0000", "0 / 3", "defaults"],
    ]  # fmt: skip
    assert f"(rte: waiting for {decoder.NAMES['eva']})" in lines  # EVA has 2 seeds on RTE
    assert "(best anchor)" in "\n".join(decoder.accuracy_table(runs, "sst2"))
    assert "(best anchor)" not in "\n".join(decoder.accuracy_table(runs, "rte"))  # until EVA's 3rd seed
