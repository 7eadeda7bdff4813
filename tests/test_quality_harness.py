"""bench/quality/glue.py: each method trains on the same backbone, and the report selects and
summarises what the runs measured (synthetic records; no accuracy is judged here)."""

from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))
pytest.importorskip("peft")
import glue  # noqa: E402
import report  # noqa: E402
import runs as runs_file  # noqa: E402

from igulora import IGULoraConfig  # noqa: E402
from igulora.data import Example  # noqa: E402
from igulora.finetune import FinetuneArgs  # noqa: E402

MODULES = [
    f"bert.encoder.layer.{i}.{kind}" for i in range(2) for kind in ("attention.self.query", "output.dense")
]


def record(method, lr, seed, val, dev, variant="default"):
    ranks = {name: random.Random(f"{method}{lr}{seed}{name}").randint(0, 6) for name in MODULES}
    return dict(
        task="sst2",
        method=method,
        lr=lr,
        seed=seed,
        variant=variant,
        overrides=glue.ABLATIONS.get(variant, {}),
        val_accuracy=val,
        dev_accuracy=dev,
        median_step_s=1.0,
        peak_rss_mb=1000.0,
        active_ranks=ranks,
    )


def synthetic_runs(seed: int) -> tuple[list[dict], dict[str, float]]:
    """A full search (vals drawn from 3 values, so ties happen) plus seeds 1, 2 at every lr."""
    rng = random.Random(seed)
    runs, expected = [], {}
    for method in glue.METHODS:
        vals = {lr: rng.choice([0.80, 0.85, 0.85]) for lr in glue.LR_GRID}
        expected[method] = min(lr for lr, v in vals.items() if v == max(vals.values()))
        for lr in glue.LR_GRID:
            runs += [record(method, lr, s, vals[lr] if s == 0 else 0.5, rng.random()) for s in (0, 1, 2)]
    rng.shuffle(runs)
    return runs, expected


@pytest.mark.parametrize("seed", range(5))
def test_the_lr_is_selected_on_validation_with_ties_to_the_smaller_lr(seed):
    runs, expected = synthetic_runs(seed)
    for method in glue.METHODS:
        assert glue.selected_lr(runs, "sst2", method) == expected[method]


def test_selection_refuses_an_incomplete_search():
    runs, _ = synthetic_runs(0)
    runs = [r for r in runs if not (r["method"] == "igu" and r["lr"] == glue.LR_GRID[-1])]
    with pytest.raises(SystemExit, match="search --task sst2"):
        glue.selected_lr(runs, "sst2", "igu")


def test_a_longer_schedule_takes_the_lr_selected_on_its_base_task():
    runs, expected = synthetic_runs(2)
    for run in runs:
        run["task"] = "rte"
    for method in glue.METHODS:
        assert glue.selected_lr(runs, "rte-6ep", method) == expected[method]
    with pytest.raises(SystemExit, match="search --task rte"):
        glue.selected_lr([r for r in runs if r["lr"] != glue.LR_GRID[0]], "rte-6ep", "lora")


def test_report_summarises_dev_over_seeds_at_the_selected_lr(tmp_path):
    runs, expected = synthetic_runs(1)
    runs.append(record("igu", expected["igu"], 0, 0.1, 0.2, variant="every-1"))
    path = report.write_report(runs, tmp_path)
    text = path.read_text()
    for method in glue.METHODS:
        label = report.METHOD_NAMES[method, "default"]
        dev = [
            r["dev_accuracy"]
            for r in sorted(runs, key=lambda r: r["seed"])
            if r["method"] == method and r["lr"] == expected[method] and r["variant"] == "default"
        ]
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {expected[method]:g} | " in row
        assert f"{statistics.median(dev):.4f}" in row and f"{statistics.mean(dev):.4f}" in row
    assert f"| every-1 | ig_every=1, score=snr | {expected['igu']:g} | 0.1000 | 0.200 | 0.2000 |" in text
    assert (tmp_path / "sst2-ranks.png").stat().st_size > 0


def test_the_6_to_2_tables_keep_the_snr_era_runs_and_their_ablations(tmp_path):
    """IGU-LoRA's 6 -> 2 runs predate the default score (ig-snr): the tables, pairs, heatmaps
    and ablations take them as the reference, each variant at its own selected lr."""
    runs, expected = synthetic_runs(2)
    for r in runs:
        if r["method"] == "igu":
            r.update(variant="ig-snr", overrides=glue.ABLATIONS["ig-snr"])
    other_lr = next(lr for lr in glue.LR_GRID if lr != expected["igu"])
    runs.append(record("igu", other_lr, 0, 0.3, 0.4, variant="every-4"))  # run at another lr
    text = report.write_report(runs, tmp_path).read_text()
    label = report.METHOD_NAMES["igu", "ig-snr"]
    assert any(
        line.startswith(f"| {label} | ") and f"| {expected['igu']:g} | " in line for line in text.splitlines()
    )
    assert f"- paired by seed, {label} - AdaLoRA 6->2 (PEFT): dev " in text
    assert f"| ig-snr | score=snr | {expected['igu']:g} | " in text
    assert f"| every-4 | ig_every=4, score=snr | {other_lr:g} | 0.3000 | 0.400 | 0.4000 |" in text
    assert (tmp_path / "sst2-ranks.png").stat().st_size > 0
    assert report.main_table([{**r, "task": "cr", "budget": 2.0} for r in runs], "cr") == []  # none at 6 -> 2
    assert glue.reference("every-4") == "ig-snr" and glue.reference("ig-product") == "default"
    assert glue.selected_lr(runs, "sst2", "igu", variant="ig-snr") == expected["igu"]


def test_the_paired_difference_compares_the_same_seeds_at_each_selected_lr():
    runs, expected = synthetic_runs(3)
    runs.append(record("igu", expected["igu"], 3, 0.5, 0.9))  # a seed the other method lacks
    dev = {
        (r["method"], r["seed"]): r["dev_accuracy"]
        for r in runs
        if r["lr"] == expected[r["method"]] and r["variant"] == "default"
    }
    diffs = [dev["igu", s] - dev["adalora", s] for s in (0, 1, 2)]
    mean, std, n = report.paired_difference(runs, "sst2", "igu", "adalora")
    assert n == 3
    assert mean == pytest.approx(statistics.mean(diffs)) and std == pytest.approx(statistics.stdev(diffs))


def _built(method: str, model_dir: Path, steps: int, budget: float | None = None):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir / "bert", num_labels=2)
    args = FinetuneArgs(
        model=str(model_dir / "bert"),
        data="unused",
        task="classification",
        output_dir="unused",
        max_steps=steps,
        exclude_modules="pooler.dense",
        **glue.method_overrides(method, budget, {}),
    )
    return glue.build(method, model, args, steps, budget)


def test_the_peft_adalora_baseline_has_no_orthogonality_term(tiny_model_dir):
    """PEFT adds AdaLoRA's regulariser only in its task-typed forward; the harness's plain
    PeftModel (every recorded AdaLoRA run) trains on the task loss alone (docs/results-details.md)."""
    module, loss_fn, _ = _built("adalora", tiny_model_dir, 12)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    penalty = sum(
        torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0]))
        for n, p in module.named_parameters()
        if n.endswith("lora_A.default")
    )
    assert penalty > 1.0  # N(0, 0.02) rows are far from orthonormal: a regulariser would show
    with torch.no_grad():
        assert float(loss_fn(batch)) == float(module.get_base_model()(**batch).loss)


def test_the_task_typed_adalora_baseline_has_peft_s_orthogonality_term(tiny_model_dir):
    """'adalora-orth' is what PEFT users get from a task-typed model: the task loss plus
    orth_reg_weight (0.5) times the mean of ||A A^T - I||_F and ||B^T B - I||_F over matrices."""
    module, loss_fn, _ = _built("adalora-orth", tiny_model_dir, 12)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    norms = []
    for name, p in module.named_parameters():
        if name.endswith(("lora_A.default", "lora_B.default")):
            p = p.detach()
            cov = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(float(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0]))))
    assert len(norms) == 2 * 2 * 6
    with torch.no_grad():
        task_loss = float(module.get_base_model()(**batch).loss)
        assert float(loss_fn(batch)) - task_loss == pytest.approx(0.5 * statistics.mean(norms), rel=1e-5)


def test_lora_at_an_average_rank_of_2_is_the_6_to_2_tables_lora(tiny_model_dir):
    """The sweep's LoRA at budget 2 (r = 2, scale 8) is the 6 -> 2 protocol's LoRA r = 2 run for
    run: the same adapters, initialisation and loss (so its recorded runs serve both)."""
    (a, loss_a, _), (b, loss_b, _) = (_built("lora", tiny_model_dir, 12, budget) for budget in (None, 2.0))
    assert a.peft_config["default"] == b.peft_config["default"]
    ours, theirs = a.state_dict(), b.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    assert loss_a(batch).item() == loss_b(batch).item()


@pytest.mark.parametrize(
    ("method", "budget"),
    [(m, None) for m in glue.ALL_METHODS]
    + [("adalora", 0.5), ("adalora-orth", 0.5), ("igu", 0.5), ("lora", 1.0), ("igu", 1.0)],
)
def test_each_method_trains_its_adapters_and_ends_within_the_budget(method, budget, tiny_model_dir):
    steps = 12
    module, loss_fn, after_step = _built(method, tiny_model_dir, steps, budget)
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0
    )
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = {
            "input_ids": torch.randint(1000, 2000, (8, 11), generator=g),
            "attention_mask": torch.ones(8, 11, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=g),
        }
        loss_fn(batch).backward()
        optimizer.step()
        after_step(step, optimizer)
        optimizer.zero_grad()
    ranks = glue.active_ranks(module)
    assert len(ranks) == 2 * 6  # 6 encoder linears per layer, the pooler excluded
    now = dict(module.named_parameters())
    changed = {
        n.split(".lora_")[0] for n in trainable if ".lora_" in n and not torch.equal(trainable[n], now[n])
    }
    assert len(changed) == len(ranks)  # every adapted module trained
    expected = glue.budget_ranks(budget)
    if method == "lora":
        assert set(ranks.values()) == {expected["lora_r"]}
    else:  # the schedule ends at the budget: the average target rank over the adapted modules
        assert sum(ranks.values()) == round(expected["target_r"] * len(ranks))
        assert max(ranks.values()) <= expected["init_r"]


def test_the_budget_sweep_searches_first_then_runs_seeds_at_the_selected_lr():
    budgets, seeds = [0.5, 1.0], [0, 1, 2]
    todo = glue.sweep_specs([], "sst2", glue.BUDGET_METHODS, budgets, seeds)
    assert {s["seed"] for s in todo} == {0}  # nothing to select an lr from yet
    assert {(s["method"], s["budget"]) for s in todo if s["method"] == "lora"} == {("lora", 1.0)}
    assert len(todo) == len(glue.LR_GRID) * (2 * len(glue.BUDGET_METHODS) - 1)
    vals = {lr: v for lr, v in zip(glue.LR_GRID, (0.7, 0.9, 0.8))}
    runs = [
        {**s, "val_accuracy": vals[s["lr"]], "dev_accuracy": 0.5}
        for s in todo
        if (s["method"], s["budget"]) == ("igu", 0.5)
    ]
    after = glue.sweep_specs(runs, "sst2", glue.BUDGET_METHODS, budgets, seeds)
    seeded = [s for s in after if s["seed"] != 0]
    assert [(s["method"], s["budget"], s["lr"], s["seed"]) for s in seeded] == [
        ("igu", 0.5, glue.LR_GRID[1], 1),
        ("igu", 0.5, glue.LR_GRID[1], 2),
    ]
    assert not any(runs_file.run_key(s) in {runs_file.run_key(r) for r in runs} for s in after)
    # budget runs stay apart from the 6 -> 2 runs of the same method, lr and seed
    assert runs_file.run_key(glue.spec("sst2", "igu", 1e-3, 0)) != runs_file.run_key(
        glue.spec("sst2", "igu", 1e-3, 0, budget=2.0)
    )
    with pytest.raises(SystemExit, match="incomplete"):
        glue.selected_lr(runs, "sst2", "igu")  # the 6 -> 2 search is another one


def test_recorded_runs_compute_what_their_labels_say_today():
    """Migration check of the runs file: each record's key, IGU-LoRA's knobs in it, is the key its
    label makes now. When a library default changes, this fails until the runs it moved are
    relabelled (as the SNR runs became ``ig-snr``); the sweep itself re-runs them meanwhile."""
    records = runs_file.load_runs(glue.RESULTS / "runs.jsonl")
    igu = [r for r in records if r["method"] in glue.IGU_METHODS]
    assert igu and all(r.get("igu_config") for r in igu)

    def label(r: dict) -> dict:
        return glue.spec(r["task"], r["method"], r["lr"], r["seed"], r["variant"], r.get("budget"))

    stale = [runs_file.run_key(r) for r in records if runs_file.run_key(r) != runs_file.run_key(label(r))]
    assert not stale, f"{len(stale)} records compute other knobs than their labels now, e.g. {stale[0]}"


def test_a_changed_default_is_a_new_run():
    one = glue.spec("sst2", "igu", 1e-3, 0, budget=2.0)
    assert one["igu_config"]["score"] == IGULoraConfig.score
    assert glue.spec("sst2", "igu-orth", 1e-3, 0)["igu_config"]["orth_reg_weight"] == glue.IGU_ORTH_WEIGHT
    # each IGU method names its term, whatever the library's default: igu-orth is the defaults now
    assert one["igu_config"]["orth_reg_weight"] == 0 and IGULoraConfig.orth_reg_weight == glue.IGU_ORTH_WEIGHT
    ablation = glue.spec("sst2", "igu", 1e-3, 0, "orth-0.25")["igu_config"]
    assert ablation["orth_reg_weight"] == 0.25  # a variant's own term wins over its method's
    other = "snr" if one["igu_config"]["score"] != "snr" else "product"
    before = {**one, "igu_config": {**one["igu_config"], "score": other}}  # recorded under another default
    assert runs_file.run_key(before) != runs_file.run_key(one)
    todo = glue.sweep_specs([before], "sst2", ["igu"], [2.0], [0])
    assert runs_file.run_key(one) in {runs_file.run_key(s) for s in todo}  # run again, not read as done
    assert "igu_config" not in glue.spec("sst2", "adalora", 1e-3, 0)  # baselines: the label alone


def test_a_later_knob_keys_only_the_runs_that_move_it():
    """orth_reg_start came after the runs file: at its old value (0) the key is the one recorded
    before it existed; igu-orth-late's 'tinit' makes a key of its own."""
    orth, late = (
        glue.spec("subj", m, 2e-3, 0, budget=2.0)["igu_config"] for m in ("igu-orth", "igu-orth-late")
    )
    assert late == {**orth, "orth_reg_start": "tinit"} and "orth_reg_start" not in orth


def test_a_budget_gives_every_method_the_same_multiple_and_lora_only_uniform_ranks():
    for budget in glue.BUDGETS:
        ranks = glue.budget_ranks(budget)
        assert ranks["init_r"] == glue.INIT_MULTIPLE * budget and ranks["target_r"] == budget
        assert ranks["lora_r"] == (None if budget < 1 else budget)
    assert glue.budget_ranks(None) == dict(lora_r=2, init_r=6, target_r=2)


@pytest.mark.skipif(not glue.DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("task", ["subj", "cr"])
def test_an_unsplit_task_is_carved_into_disjoint_fixed_splits(task):
    train, val, test = glue.split_train(task)
    again = glue.split_train(task)
    assert [e.text for e in again[2]] == [e.text for e in test]  # a fixed seed
    lines = glue.TASKS[task]["file"].read_text(encoding="latin-1").split("\n")
    assert len(train) + len(val) + len(test) == sum(1 for line in lines if line.strip())
    assert len(test) == int(glue.TEST_FRACTION * (len(train) + len(val) + len(test)))
    ids = [{id(e) for e in split} for split in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert {e.label for e in test} == {0, 1}


def test_a_run_without_val_is_recorded_with_its_dev_alone(tmp_path, capsys):
    one = {"task": "rte", "method": "lora", "lr": 1e-3, "seed": 0, "variant": "default"}
    script = tmp_path / "fake.py"  # answers as glue.py's ``one`` does: the record last on stdout
    script.write_text("import json, sys\nprint(json.dumps(json.loads(sys.argv[2]) | {'dev_accuracy': 0.5}))")
    path = tmp_path / "runs.jsonl"
    runs_file.run_spec(one, path, script=script)
    (record,) = runs_file.load_runs(path)
    assert runs_file.run_key(record) == runs_file.run_key(one) and "val_accuracy" not in record
    assert "dev 0.5000" in capsys.readouterr().out


def test_a_run_claimed_by_a_live_driver_is_skipped_and_a_dead_one_s_is_taken(tmp_path):
    runs = tmp_path / "runs.jsonl"
    one = glue.spec("sst2", "igu", 1e-3, 0, budget=1.0)
    claim = runs_file._claim(one, runs)
    assert claim is not None and runs_file._held(claim)
    assert runs_file._claim(one, runs) is None  # this process is alive
    claim.write_text("999999999")  # no such process
    assert not runs_file._held(claim)
    assert runs_file._claim(one, runs) == claim and claim.read_text() == str(os.getpid())


def test_the_budget_report_counts_parameters_and_says_what_is_missing(tmp_path):
    shapes = {name: (24, 37) for name in MODULES}
    plan = report.SweepPlan((0.5, 1.0), ("lora", "igu"), 2, glue.LR_GRID, glue.budget_ranks)
    runs = []
    for lr in glue.LR_GRID:
        for seed in (0, 1):
            run = record("igu", lr, seed, 0.8 + lr, 0.7 + seed / 100)
            run.update(budget=1.0, active_ranks=dict.fromkeys(MODULES, 1))
            runs.append(run)
    runs.append({**record("lora", glue.LR_GRID[0], 0, 0.8, 0.7), "budget": 1.0})
    assert report.adapter_parameters(runs[0], shapes) == len(MODULES) * (24 + 37 + 1)  # + E
    lines = report.budget_table(runs, "sst2", shapes, plan)
    text = "\n".join(lines)
    assert "| 0.5 | LoRA (PEFT) | no uniform rank |" in text
    row = next(line for line in lines if line.startswith(f"| 1 | {report.BUDGET_NAMES['igu']} |"))
    assert f"| {len(MODULES) * 62:,} |" in row and f"| {glue.LR_GRID[-1]:g} |" in row
    assert "0.5 / igu: lr search (0 of 3)" in text and "1 / lora: lr search (1 of 3)" in text
    assert report.budget_plot(runs, "sst2", shapes, plan, tmp_path).stat().st_size > 0


def test_the_auto_nodes_section_compares_with_the_fixed_count_run_of_the_same_seed(tmp_path):
    runs, expected = synthetic_runs(4)
    lr = expected["igu"]
    checks = [[2 * i, 3 + (i >= 4), 1.1, 1.0] for i in range(8)]  # residual 0.1 of a gap of 1
    auto = {**record("igu", lr, 0, 0.5, 0.9, variant="gl-auto"), "ig_checks": checks}
    runs.append(auto)
    assert report.window_residuals(checks, 4) == pytest.approx([0.1, 0.1])
    # the fixed-count twin has gl-auto's settings (snr) less ig_steps, not the defaults
    runs.append(base := record("igu", lr, 0, 0.6, 0.8, variant="ig-snr"))
    same = {**base, "active_ranks": dict(auto["active_ranks"])}
    assert report.allocation_overlap(same, auto) == 1.0
    lines = report.auto_nodes_section(runs, "sst2", tmp_path, window=4, fixed=3)
    row = next(line for line in lines if line.startswith("| 0 |"))
    assert "| 3.50 (3-4) | 1.17 |" in row and f"0.9000 / {base['dev_accuracy']:.4f}" in row
    assert (tmp_path / "sst2-auto-nodes.png").stat().st_size > 0


def test_the_score_table_pairs_each_variant_with_the_default_score_by_seed():
    runs = []
    for lr in glue.LR_GRID:
        runs.append({**record("igu", lr, 0, 0.8 + lr, 0.80), "budget": 0.5})
    lr = glue.LR_GRID[-1]
    runs += [{**record("igu", lr, s, 0.5, 0.80 + s / 100), "budget": 0.5} for s in (1, 2)]
    runs += [
        {**record("igu", lr, s, 0.5, 0.79 + s / 100, variant="ig-product"), "budget": 0.5} for s in (0, 1, 2)
    ]
    lines = report.score_table(runs, "sst2", 0.5, report.SCORE_VARIANTS, glue.LR_GRID)
    assert report.score_table(runs[1:], "sst2", 0.5, report.SCORE_VARIANTS, glue.LR_GRID) == []  # unsearched
    row = next(line for line in lines if line.startswith("| product"))
    assert f"| {lr:g} | 0.790, 0.800, 0.810 | 0.8000 | -0.0100 +- 0.0000 over 3 seeds |" in row
    default = next(line for line in lines if line.startswith("| stable_magnitude (default) |"))
    assert default.endswith("| 0.8100 |  |")  # no difference to itself
    assert not any(line.startswith("| snr") for line in lines)  # not run


def test_median_ranks_share_places_on_ties():
    assert report.median_ranks({"a": 0.9, "b": 0.8}) == {"a": 1, "b": 2}
    assert report.median_ranks({"a": 0.85, "b": 0.85}) == {"a": 1.5, "b": 1.5}


def _cells(task: str, method: str, medians_by_seed: list[float]) -> list[dict]:
    """A full lr search at budget 2 (lr 2e-3 selected on val) and seeds 1, 2 there."""
    runs = []
    for lr in glue.LR_GRID:
        val = 0.9 if lr == 2e-3 else 0.7
        runs.append({**record(method, lr, 0, val, medians_by_seed[0]), "task": task, "budget": 2.0})
    for seed in (1, 2):
        runs.append({**record(method, 2e-3, seed, 0.5, medians_by_seed[seed]), "task": task, "budget": 2.0})
    return runs


def test_the_summary_sets_the_newest_defaults_beside_the_best_anchor():
    def igu(method: str, variant: str, task: str, budget: float, dev: list[float]) -> list[dict]:
        at = {"task": task, "budget": budget}
        return [{**record(method, 2e-3, seed, 0.5, d, variant), **at} for seed, d in enumerate(dev)]

    runs = _cells("sst2", "adalora-orth", [0.80, 0.81, 0.82]) + _cells("sst2", "adalora", [0.83, 0.84, 0.85])
    runs += _cells("sst2", "lora", [0.79, 0.80, 0.81]) + _cells("cr", "lora", [0.9] * 3)
    runs += igu("igu-orth-live", "window-2", "sst2", 2.0, [0.83, 0.85, 0.87])  # the defaults
    runs += igu("igu-orth-live", "default", "sst2", 2.0, [0.1] * 3)  # older: not shown beside newer
    runs += igu("igu-orth", "default", "rte", 2.0, [0.6] * 3)  # the only IGU-LoRA runs, no anchor
    runs += igu("igu-orth-live", "window-2", "cr", 2.0, [0.9] * 2)  # 2 seeds: not yet a cell
    lines = report.summary_table(runs)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][2:]
    assert rows[0][:8] == ["sst2", "MiniLM-L6", "2", "0.850", "0.810", "0.840*", "0.800", ""]  # no EVA
    assert rows[0][8:] == ["+0.0100 +- 0.0058 (t = 1.73)", "2 / 3", "defaults"]  # against AdaLoRA
    assert [row[0] for row in rows] == ["sst2"]  # CR has 2 IGU-LoRA seeds, RTE no anchor


@pytest.mark.parametrize(
    ("orth_medians", "verdict"),
    [((0.81, 0.81, 0.79, 0.81), "the rule sets 0.25."), ((0.81, 0.79, 0.79, 0.81), "the rule sets 0.")],
)
def test_the_defaults_rule_ranks_medians_per_task_and_a_tie_keeps_0(orth_medians, verdict):
    plan = report.SweepPlan((2.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, glue.DEFAULTS_TASKS, 2.0)
    runs = []
    for task, orth in zip(glue.DEFAULTS_TASKS, orth_medians):
        runs += _cells(task, "igu", [0.80, 0.79, 0.80])  # median 0.80 on every task
        runs += _cells(task, "igu-orth", [orth, orth - 0.02, orth + 0.01])
    lines = report.defaults_section(runs, plan)
    assert lines[-2].endswith(verdict), lines[-2]
    row = next(line for line in lines if line.startswith(f"| rte | {report.DEFAULT_CELLS['igu-orth']} |"))
    assert f"| 0.002 | {orth_medians[1]:.3f}, " in row and row.endswith("|  |")  # the defaults: the reference
    row = next(line for line in lines if line.startswith(f"| rte | {report.DEFAULT_CELLS['igu']} |"))
    assert "over 3 seeds" in row
    assert "Still missing (task / setting): sst2 / lora;" in "\n".join(lines)
    partial = [r for r in runs if not (r["task"] == "cr" and r["method"] == "igu-orth" and r["seed"] == 2)]
    assert report.defaults_section(partial, plan)[-2].endswith("undecided until every task has both.")


def test_the_fix_cells_pair_with_the_term_from_step_0_and_stay_out_of_the_rule():
    plan = report.SweepPlan((2.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, glue.DEFAULTS_TASKS, 2.0)
    runs = []
    for task in glue.DEFAULTS_TASKS:
        runs += _cells(task, "igu", [0.80, 0.79, 0.80]) + _cells(task, "igu-orth", [0.81, 0.79, 0.82])
    before = report.defaults_section(runs, plan)
    lines = report.defaults_section(runs + _cells("subj", "igu-orth-late", [0.83, 0.80, 0.81]), plan)
    # seed by seed 0.83 - 0.81, 0.80 - 0.79, 0.81 - 0.82
    fix = "The term from tinit against from step 0 (paired): subj dev +0.0067 +- 0.0153"
    assert lines[-2].startswith(fix), lines[-2]
    assert lines[-4] == before[-2] and "the rule sets" in lines[-4]  # the rule's line did not move
    row = "| subj | IGU-LoRA, orth_reg_weight 0.25 from tinit | 0.002 | 0.830, 0.800, 0.810 | 0.8100 |"
    assert any(line.startswith(row) for line in lines)
    assert not any("igu-orth-late" in line for line in lines)  # not run elsewhere: not "missing"


def test_the_defaults_tasks_outside_the_budget_sweep_get_no_budget_curve(tmp_path):
    plan = report.SweepPlan(
        (2.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, ("sst2", "cr"), 2.0, sweep_tasks=("sst2",)
    )
    runs = [
        {**run, "active_ranks": dict.fromkeys(MODULES, 2)}
        for task in ("sst2", "cr")
        for run in _cells(task, "igu", [0.80, 0.79, 0.80])
    ]
    text = report.write_report(runs, tmp_path, dict.fromkeys(MODULES, (24, 37)), plan).read_text()
    assert "### sst2: accuracy against the budget" in text
    assert "### cr: accuracy against the budget" not in text and "| cr | IGU-LoRA, orth_reg_weight 0" in text


def test_the_budget_plot_keeps_the_medians_readable_beside_a_collapsed_seed(tmp_path, monkeypatch):
    shapes = {name: (24, 37) for name in MODULES}
    plan = report.SweepPlan((1.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks)
    dev = {0: 0.85, 1: 0.509, 2: 0.86}  # seed 1 collapsed to the majority class
    runs = [
        {**record("igu", lr, seed, 0.8 + lr, dev[seed]), "budget": 1.0}
        for lr in glue.LR_GRID
        for seed in (0, 1, 2)
    ]
    drawn = {}

    def spy(fig, *args):
        ax = fig.axes[0]
        drawn.update(bottom=ax.get_ylim()[0], notes=[t.get_text() for t in ax.texts])
        return saved(fig, *args)

    saved = report._saved
    monkeypatch.setattr(report, "_saved", spy)
    report.budget_plot(runs, "sst2", shapes, plan, tmp_path)
    assert 0.85 - 2 * report.COLLAPSE_MARGIN < drawn["bottom"] < 0.85 - report.COLLAPSE_MARGIN / 2
    assert "a seed at 0.509" in drawn["notes"]


def test_the_budget_loss_plot_draws_each_budget_s_median_curve_at_the_selected_lr(tmp_path, monkeypatch):
    plan = report.SweepPlan((0.5, 1.0, 4.0), ("lora", "igu"), 3, glue.LR_GRID, glue.budget_ranks)
    runs = []
    for budget in (0.5, 1.0):  # nothing ran at 4: no panel
        for lr in glue.LR_GRID:
            for seed in (0, 1, 2):
                curve = [0.69 - lr * seed * step for step in range(5)]  # lr and seed set the slope
                val = 0.9 if lr == glue.LR_GRID[1] else 0.8
                runs.append({**record("igu", lr, seed, val, 0.8), "budget": budget, "loss_curve": curve})
    runs.append({**record("igu", glue.LR_GRID[1], 3, 0.9, 0.8), "budget": 1.0})  # before loss curves
    drawn = {}

    def spy(fig, path):
        drawn.update(titles=[ax.get_title() for ax in fig.axes], lines=[ax.get_lines() for ax in fig.axes])
        return written(fig, path)

    written = report._written
    monkeypatch.setattr(report, "_written", spy)
    assert report.budget_loss_plot(runs, "sst2", plan, tmp_path).name == "sst2-budget-loss.png"
    assert drawn["titles"] == ["avg. rank 0.5", "avg. rank 1"]
    lr = glue.LR_GRID[1]
    for lines in drawn["lines"]:
        curve, chance = lines  # igu's median (seed 1's slope), then ln 2
        assert list(curve.get_ydata()) == pytest.approx([0.69 - lr * step for step in range(5)])
        assert list(curve.get_xdata()) == [0, 10, 20, 30, 40]
        assert chance.get_ydata()[0] == pytest.approx(0.6931, abs=1e-4)


@pytest.mark.parametrize(("majority", "drawn"), [(0.55, True), (0.509, False)])
def test_the_budget_plot_draws_the_majority_class_near_the_medians(tmp_path, monkeypatch, majority, drawn):
    shapes = {name: (24, 37) for name in MODULES}
    plan = report.SweepPlan((1.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, majority={"sst2": majority})
    runs = [
        {**record("igu", lr, seed, 0.8 + lr, 0.56 + seed / 100), "budget": 1.0}
        for lr in glue.LR_GRID
        for seed in (0, 1, 2)
    ]
    labels = []

    def spy(fig, *args):
        labels.extend(line.get_label() for line in fig.axes[0].get_lines())
        return saved(fig, *args)

    saved = report._saved
    monkeypatch.setattr(report, "_saved", spy)
    report.budget_plot(runs, "sst2", shapes, plan, tmp_path)
    assert (f"majority class ({majority:.3f})" in labels) is drawn


def test_the_majority_share_is_the_most_common_label_s():
    examples = [Example("a", None, label) for label in (1, 0, 1, 1)]
    assert glue.majority_share(examples) == 0.75


@pytest.mark.parametrize(
    ("shortfall", "verdict"),
    [
        ({"sst2": 0.01, "rte": 0.01, "subj": -0.03, "cr": 0.0}, "live"),  # at the margin: not below it
        ({"sst2": 0.011, "rte": 0.0, "subj": 0.0, "cr": 0.0}, "live"),  # one task past 0.01
        ({"sst2": 0.011, "rte": 0.012, "subj": -0.05, "cr": -0.05}, "all"),  # two tasks past 0.01
        ({"sst2": 0.021, "rte": -0.02, "subj": -0.02, "cr": -0.02}, "all"),  # one past 0.02
    ],
)
def test_the_live_ranks_rule_is_non_inferiority_by_the_written_margins(shortfall, verdict):
    assert report.live_verdict(shortfall) == verdict


def test_the_live_ranks_cells_run_every_seed_at_the_lr_selected_for_the_term_over_all_ranks():
    budget, seeds = [2.0], [0, 1, 2]
    with pytest.raises(SystemExit, match="igu-orth lr search is incomplete"):
        glue.sweep_specs([], "cr", ["igu-orth-live"], budget, seeds)
    runs = _cells("cr", "igu-orth", [0.8, 0.8, 0.8])
    todo = glue.sweep_specs(runs, "cr", ["igu-orth-live"], budget, seeds)
    assert [(s["lr"], s["seed"], s["igu_config"]["orth_reg_ranks"]) for s in todo] == [
        (2e-3, 0, "live"),
        (2e-3, 1, "live"),
        (2e-3, 2, "live"),
    ]


def test_the_live_ranks_section_pairs_seeds_and_waits_for_every_task():
    plan = report.SweepPlan((2.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, glue.DEFAULTS_TASKS, 2.0)
    runs = []
    for task in glue.DEFAULTS_TASKS:
        runs += _cells(task, "igu-orth", [0.80, 0.79, 0.80])
        live = [0.78, 0.77, 0.78] if task in ("sst2", "rte") else [0.80, 0.80, 0.80]
        runs += [{**r, "method": "igu-orth-live"} for r in _cells(task, "igu-orth", live) if r["lr"] == 2e-3]
    lines = report.live_ranks_section(runs, plan)
    assert lines[-2].endswith("the rule sets orth_reg_ranks = 'all'."), lines[-2]
    assert "sst2 +0.0200, rte +0.0200, subj +0.0000" in lines[-2]  # medians 0.80 - 0.78
    row = next(line for line in lines if line.startswith("| rte |"))
    assert "dev -0.0200 +- 0.0000 over 3 seeds" in row
    dropped = ("igu-orth-live", "cr", 1)
    partial = [r for r in runs if (r["method"], r["task"], r["seed"]) != dropped]
    assert report.live_ranks_section(partial, plan)[-2].endswith("undecided until cr has every seed of both.")
    assert report.live_ranks_section([r for r in runs if r["method"] == "igu-orth"], plan) == []


def test_the_ig_cost_rule_picks_the_cheapest_variant_within_both_margins_and_the_overlap_floor():
    variants = {v: {} for v in ("window-2", "lobatto-2", "stochastic-1", "fraction-0.0625")}
    plan = report.SweepPlan(
        (2.0,), ("igu",), 3, glue.LR_GRID, glue.budget_ranks, glue.DEFAULTS_TASKS, 2.0,
        ig_cost_variants=variants, ig_rows=lambda run: run["rows"],
    )  # fmt: skip
    # each seed of the defaults keeps 2 of 3 modules (any two overlap 1/2); a variant keeping its
    # paired seed's ranks overlaps 1, one keeping the unkept module 0
    ranks = {seed: {m: int(i != seed) for i, m in enumerate(MODULES[:3])} for seed in range(3)}
    runs = []
    for task, low in (("sst2", 0.809), ("rte", 0.779)):  # 0.80 - 0.809: within 0.01; 0.80 - 0.779: not 0.02
        reference = [{**r, "task": task, "rows": 10.0} for r in _cells(task, "igu-orth", [0.80, 0.80, 0.80])]
        runs += [{**r, "active_ranks": ranks[r["seed"]]} for r in reference]
        for variant, dev, rows, kept in (
            ("window-2", 0.80, 4.0, "same"),
            ("fraction-0.0625", 0.81, 5.0, "same"),
            ("lobatto-2", low, 3.0, "same"),  # cheapest, but below the margin on rte
            ("stochastic-1", 0.82, 3.0, "other"),  # better, but keeps other ranks
        ):
            for seed in range(3):
                kept_ranks = ranks[seed] if kept == "same" else {m: 1 - k for m, k in ranks[seed].items()}
                runs.append(
                    {**record("igu-orth", 2e-3, seed, 0.5, dev if seed else 0.79, variant), "task": task}
                    | {"budget": 2.0, "rows": rows, "active_ranks": kept_ranks}
                )
    lines = report.ig_cost_section(runs, plan)
    assert lines[-2] == "qualify: window-2, fraction-0.0625; the rule makes window-2 the default.", lines[-2]
    row = next(line for line in lines if line.startswith("| rte | lobatto-2 |"))
    assert row.endswith("| 1.000 | 0.30 | no |"), row  # median 0.779 < 0.80 - 0.02
    row = next(line for line in lines if line.startswith("| sst2 | stochastic-1 |"))
    assert "| 0.000 | 0.30 | no |" in row
    assert (
        "| sst2 | defaults (igu-orth) | 0.800, 0.800, 0.800 | 0.8000 |  | 0.500 (seed to seed) |" in lines[4]
    )
    unfinished = [r for r in runs if (r["variant"], r["task"], r["seed"]) != ("window-2", "rte", 2)]
    assert report.ig_cost_section(unfinished, plan)[-2].startswith("undecided")


def test_ig_row_counts_follow_the_nodes_rows_and_scoring_steps_of_each_variant():
    run = {"task": "sst2", "method": "igu-orth", "budget": 2.0, "steps": 194}
    rows = {v: glue.ig_row_evaluations({**run, "overrides": o}) for v, o in glue.IG_COST_VARIANTS.items()}
    defaults = glue.ig_row_evaluations({**run, "overrides": {}})
    # SST-2's epoch: 194 steps, tinit 19, tfinal 38, delta_t 9; a batch of 32 has 4 IG rows at 1/8.
    # The defaults score steps 0, 2, .. 154 (78) with 3 Gauss-Legendre nodes
    assert defaults == 78 * 3 * 4
    # the window: the 2 updates up to each multiple of 9 from 27 to 153 (15 of them), and 154, 155
    # before the final phase's allocation at 156
    assert rows["window-2"] == (2 * 15 + 2) * 3 * 4
    assert rows["lobatto-2"] == 78 * 1 * 4  # one node below alpha = 1
    assert rows["fraction-0.0625"] == 78 * 3 * 2
    # one draw from the 20-interval trapezoid grid lands on alpha = 1 with probability (1/40) / (39/40)
    assert rows["stochastic-1"] == pytest.approx(78 * 4 * (1 - 1 / 39))
