"""bench/quality/controls.py: the five fixed-rank patterns hold one total under one cap, the
inverted one puts IGU-LoRA's ranks where it put the fewest, PEFT LoRA trains exactly the pattern,
and the report pairs every pattern with the uniform one by seed."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))
pytest.importorskip("peft")
import controls  # noqa: E402
import glue  # noqa: E402
from report import rank_overlap  # noqa: E402
from runs import run_key  # noqa: E402

BUDGET = 2.0
MODULES = [
    f"bert.encoder.layer.{i}.{kind}" for i in range(3) for kind in ("attention.self.query", "output.dense")
]
CAP = round(glue.INIT_MULTIPLE * BUDGET)


def allocation(seed: int) -> dict[str, int]:
    """A random split of BUDGET x modules ranks, each at most CAP."""
    rng, ranks = random.Random(seed), dict.fromkeys(MODULES, 0)
    for _ in range(int(BUDGET * len(MODULES))):
        ranks[rng.choice([n for n in MODULES if ranks[n] < CAP])] += 1
    return ranks


def sweep_runs() -> list[dict]:
    """glue.py's lr searches at BUDGET (the middle lr wins) and seeds 1, 2 for the two sources."""
    runs = []
    for method, prefix in (("igu-orth", ""), ("adalora-orth", "base_model.model."), ("lora", "")):
        for lr in glue.LR_GRID:
            for seed in (0, 1, 2):
                ranks = {prefix + n: r for n, r in allocation(hash((method, lr, seed)) % 1000).items()}
                val = 0.9 if lr == glue.LR_GRID[1] else 0.8
                runs.append(
                    dict(task="sst2", method=method, lr=lr, seed=seed, variant="default", budget=BUDGET,
                         val_accuracy=val, dev_accuracy=0.5, final_loss=0.4, active_ranks=ranks)
                )  # fmt: skip
    return runs


def test_the_patterns_hold_one_total_under_one_cap():
    runs = sweep_runs()
    chosen = controls.patterns(runs, "sst2", BUDGET)
    assert set(chosen) == set(controls.PATTERNS)
    source = next(r for r in runs if (r["method"], r["seed"], r["lr"]) == ("igu-orth", 0, glue.LR_GRID[1]))
    assert chosen["igu"] == source["active_ranks"]  # the selected lr's seed-0 run
    assert chosen["uniform"] == dict.fromkeys(MODULES, 2)
    for name, pattern in chosen.items():
        assert sorted(pattern) == sorted(MODULES), name
        assert sum(pattern.values()) == BUDGET * len(MODULES) and max(pattern.values()) <= CAP, name
    assert controls.random_pattern(MODULES, 12, CAP) == chosen["random"]  # seeded


def test_the_inverted_pattern_deals_the_same_ranks_in_reverse_order():
    igu = {"a": 0, "b": 5, "c": 1, "d": 5, "e": 1}
    inverted = controls.inverted_pattern(igu)
    assert sorted(inverted.values()) == sorted(igu.values())
    assert inverted["a"] == 5 and {inverted["b"], inverted["d"]} == {0, 1}
    assert rank_overlap(igu, inverted) < rank_overlap(igu, dict.fromkeys(igu, 2))


def test_lora_trains_exactly_the_pattern_at_one_scale(tiny_model_dir):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tiny_model_dir / "bert", num_labels=2)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]
    pattern = {name: i % 4 for i, name in enumerate(linears)}  # rank 0: left unadapted
    module, loss, after = glue.peft_build(
        "lora-pattern", model, 10, None, glue.ENCODER_LINEARS, "SEQ_CLS", ["classifier"], pattern
    )
    held = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0]
            for n, p in module.named_parameters() if n.endswith("lora_A.default.weight")}  # fmt: skip
    assert held == {n: r for n, r in pattern.items() if r}
    scales = {m.scaling["default"] for m in module.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scales == {glue.SCALE}
    batch = {"input_ids": torch.randint(1000, 2000, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    assert torch.isfinite(loss(batch)) and after(0, None) is None
    with pytest.raises(ValueError, match="rank_pattern"):
        glue.peft_build("lora-pattern", model, 10, None, glue.ENCODER_LINEARS, "SEQ_CLS", None, {})


def test_each_pattern_is_a_cell_at_lora_s_lr_and_the_report_pairs_it_with_uniform():
    runs = sweep_runs()
    specs = controls.control_specs(runs, "sst2", BUDGET, controls.PATTERNS, [0, 1])
    assert {s["lr"] for s in specs} == {glue.LR_GRID[1]} and len({run_key(s) for s in specs}) == 10
    records = [
        {**s, "dev_accuracy": 0.8 + 0.01 * (s["variant"] == "igu") + 0.001 * s["seed"], "final_loss": 0.4}
        for s in specs
    ]
    text = "\n".join(controls.report(records, runs))
    assert "| igu | 1.00 | 0.810, 0.811 | 0.8105 | +0.0100 +- 0.0000 | 2 / 2 |" in text
    assert "igu - adalora (paired +- s.e.): +0.0100 +- 0.0000, igu ahead on 2 / 2 seeds" in text
    floor = "(the same rank, lr and seed; the noise floor): seed 0: dev +0.3000, final loss +0.0e+00, seed 1:"
    assert floor in text  # the fake LoRA runs score 0.5
    lora_seed_0 = next(r for r in runs if (r["method"], r["lr"], r["seed"]) == ("lora", glue.LR_GRID[1], 0))
    lora_seed_0 |= {"dev_accuracy": 0.8, "final_loss": 0.4004}
    assert "seed 0: dev +0.0000, final loss -1.0e-03" in "\n".join(controls.report(records, runs))
    other_lr = [r | {"lr": glue.LR_GRID[0]} for r in records if r["variant"] == "uniform"]
    assert controls.reproduced(other_lr, [lora_seed_0]).endswith("no seed run by both at one lr")
