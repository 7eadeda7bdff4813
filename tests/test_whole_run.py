"""bench/whole_run.py on a tiny Llama and a character tokenizer: the SmolLM2 runs' code (the chat
framing, the answer-only loss, the log-likelihood accuracy, the phase timing, the memory
accounting) with only the backbone swapped. No timing is judged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "bench" / "quality"),
]
pytest.importorskip("peft")
import causal  # noqa: E402
from conftest import char_tokenizer, tiny_llama  # noqa: E402

from bench import step_profile, whole_run  # noqa: E402
from igulora import causal_lm_row_loss  # noqa: E402
from igulora.data import Example  # noqa: E402
from igulora.model import ORTHOGONALITY_RANGE  # noqa: E402

STEPS, INIT_R, TARGET_R, LORA_R = 20, 8, 2, 2  # 20 steps: tinit 2, tfinal 4, all three phases
PROFILED = 2  # the last steps, after a warm-up one, under torch's profiler: 3 of the 4 final ones
REVIEWS = ["a fun film", "dull and slow", "great acting", "a bad plot", "warm", "boring", "lovely", "weak"]


def backbone():
    """(tiny Llama, character tokenizer): a prompt is ~120 tokens, past the config's 32 positions,
    which rotary embeddings do not bound."""
    return tiny_llama(vocab_size=61), char_tokenizer()


def shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear a method adapts (all but the LM head)."""
    model, _ = backbone()
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("sst2")
    lines = [f"{i % 2 == 0:d} {text}" for i, text in enumerate(REVIEWS)]
    (folder / "train").write_text("\n".join(lines) + "\n")
    (folder / "dev").write_text("\n".join(reversed(lines)) + "\n")
    spec = {
        "model": "tiny", "seed": 0, "batch": 4, "steps": STEPS, "lr": 1e-2, "dev_examples": 6,
        "train_file": str(folder / "train"), "dev_file": str(folder / "dev"), "train_examples": len(REVIEWS),
        "profile_steps": PROFILED,
    }  # fmt: skip
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits on a busy machine
    try:
        for method in whole_run.METHODS:
            overrides = {"igu_overrides": {"orth_reg_ranks": "live"}} if method == "igu" else {}
            out[method] = whole_run.run_method({**spec, "method": method, **overrides}, load=backbone)
    finally:
        torch.set_num_threads(threads)
    return out


def test_the_framing_masks_all_but_the_answer_and_scores_its_log_likelihood():
    model, tokenizer = backbone()
    batches = causal.ChatBatches(
        [Example("great", label=1), Example("a dull film", label=0)], tokenizer, 2, 0, causal.FRAMES["sst2"]
    )
    batch = batches.encode(batches.examples)
    for row, answer in zip(range(2), ("positive", "negative")):
        answered = batch["labels"][row] != -100
        assert (
            batch["input_ids"][row][answered].tolist()
            == tokenizer(answer, add_special_tokens=False).input_ids
        )
        assert not (answered & (batch["attention_mask"][row] == 0)).any()
    assert (batch["attention_mask"][0] == 0).any()  # the shorter review is padded (on the right)
    with torch.no_grad():  # what IGU-LoRA's loss averages is Hugging Face's (PEFT's) token mean
        nll, count = causal_lm_row_loss(model, batch)
        assert float(nll.sum() / count.sum()) == pytest.approx(float(model(**batch).loss), rel=1e-5)
        keep = batch["attention_mask"][0] == 1  # the padded row alone, unpadded
        ids, labels = batch["input_ids"][0][keep], batch["labels"][0][keep]
        logp = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
        answer = labels[1:] != -100
        manual = -logp[answer].gather(1, labels[1:][answer][:, None]).sum()
    assert float(nll[0]) == pytest.approx(float(manual), rel=1e-5)


def test_each_method_trains_to_its_budget_and_keeps_what_it_holds(records):
    features = shapes()
    for method, r in records.items():
        assert sum(r["phase_s"].values()) == pytest.approx(r["training_s"])
        assert all(r["median_step_s"][p] is not None for p in whole_run.PHASES)
        assert r["adapted_linears"] == len(features)
        assert r["kept_triplets"] == TARGET_R * len(features), method
        assert 0 <= r["dev_accuracy"] <= 1 and r["peak_rss_mb"] > 0
        assert r["adamw_state_bytes"] == 2 * r["trainable_bytes"] == 8 * r["trainable_params"]  # fp32 moments
    for method in ("adalora", "adalora-orth"):  # PEFT AdaLoRA holds every rank to the end
        adalora = records[method]
        assert adalora["held_ranks"] == INIT_R * len(features)
        assert adalora["trainable_params"] == INIT_R * sum(i + o + 1 for i, o in features.values())
    igu = records["igu"]
    assert igu["held_ranks"] == igu["kept_triplets"]  # compacted
    kept = igu["active_ranks"]
    assert igu["trainable_params"] == sum(k * (sum(features[n]) + 1) for n, k in kept.items())
    assert igu["trainable_params"] < records["adalora"]["trainable_params"]
    assert igu["adamw_state_bytes"] < records["adalora"]["adamw_state_bytes"]
    assert records["lora"]["trainable_params"] == LORA_R * sum(i + o for i, o in features.values())


def test_the_report_has_a_row_per_method(records, tmp_path):
    rows = list(records.values())
    table = whole_run.table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "orth_reg_ranks=live" in table[2] and table[3].startswith("| AdaLoRA (PEFT, with term) | ")
    assert table[3].split(" | ")[7] == "1.00"  # the whole-run ratio of the reference to itself
    whole_run.write(tmp_path / "r.json", {"model": "tiny"}, rows)
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in written["records"]] == list(whole_run.METHODS)
    assert written["table"] == "\n".join(table)


def test_the_last_steps_are_profiled_by_range(records):
    for method, r in records.items():
        profile = r["profile"]
        assert profile["steps"] == PROFILED
        assert set(step_profile.REGIONS) <= set(profile["region_ms"]), method
        for region in ("forward", "backward", "optimizer"):  # each region's own ops, nested ones too
            assert profile["ops_per_step"][region] > 1, (method, region)
        assert len(profile["top_ops"]) == step_profile.TOP
        assert not {op["op"] for op in profile["top_ops"]} & set(step_profile.RANGES)
    igu = records["igu"]["profile"]
    assert igu["region_ms"][ORTHOGONALITY_RANGE] > 0
    assert igu["ops_per_step"][ORTHOGONALITY_RANGE] >= 2 * len(shapes())  # A A^T and B^T B per adapter
    assert ORTHOGONALITY_RANGE not in records["adalora-orth"]["profile"]["region_ms"]  # PEFT's: no range
    table = step_profile.table({m: r["profile"] for m, r in records.items()}).splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:]]
    assert [row[0] for row in cells] == list(step_profile.RANGES)
    assert cells[-1][2:] == ["", "", ""]  # only IGU-LoRA (the first column) has the range


def test_the_results_file_keeps_each_method_as_it_finishes(records, tmp_path, monkeypatch):
    finished = iter([records["lora"]])

    def child(spec: dict) -> dict:
        record = next(finished, None)
        if record is None:
            raise KeyboardInterrupt  # the second method is stopped mid-run
        return record

    monkeypatch.setattr(whole_run, "child", child)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        whole_run.main(["--model", "smollm2", "--methods", "lora", "igu", "--json", str(path)])
    written = json.loads(path.read_text())
    assert [r["method"] for r in written["records"]] == ["lora"]
    assert written["meta"]["command"].endswith(f"--methods lora igu --json {path}")
