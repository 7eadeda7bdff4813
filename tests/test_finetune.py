"""igulora finetune: data formats, one-line errors, a tiny end-to-end run and exact resume."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_sentiment_jsonl
from safetensors.torch import load_file

from igulora.data import DataError, load_examples
from igulora.finetune import FinetuneArgs, latest_checkpoint, run_finetune


def test_data_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    (tmp_path / "a.tsv").write_text('sentence1\tsentence2\tlabel\n"say ""hi"""\tthere\t1\n')
    (tmp_path / "a.csv").write_text("review,stars\nfine,3\n")
    (tmp_path / "a.train").write_text("1 a stirring , funny film\n0 dull\n")
    assert [e.label for e in load_examples(tmp_path / "a.jsonl", task="classification")] == [1, 0]
    pair = load_examples(
        tmp_path / "a.tsv", task="classification", text_column="sentence1", text_pair_column="sentence2"
    )
    assert (pair[0].text, pair[0].text_pair, pair[0].label) == ('say "hi"', "there", 1)
    csv_examples = load_examples(
        tmp_path / "a.csv", task="classification", text_column="review", label_column="stars"
    )
    assert csv_examples[0].label == 3
    sst = load_examples(tmp_path / "a.train", task="classification", data_format="label-text")
    assert sst[0].text == "a stirring , funny film" and sst[1].label == 0
    assert load_examples(tmp_path / "a.jsonl", task="causal-lm")[0].label is None


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ('{"text": "x"}\n', {}, r"no column 'label'; columns are \['text'\]"),
        ('{"text": "x", "label": "pos"}\n', {}, "label 'pos' is not an integer"),
        ('{"text": \n', {}, r"a\.jsonl:1: not valid JSON"),
        ('{"text": "x", "label": 1}\n', {"text_column": "sentence"}, "no column 'sentence'"),
    ],
)
def test_data_errors_name_the_problem(tmp_path, content, kwargs, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(tmp_path / "a.jsonl", task="classification", **kwargs)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "a.dat").write_text("1 x\n")
    with pytest.raises(DataError, match="pass --data-format"):
        load_examples(tmp_path / "a.dat", task="classification")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl", task="classification")


def _args(tmp_path, model_dir, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    base = dict(
        model=str(model_dir),
        data=str(data),
        eval_data=str(data),
        task="classification",
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        batch_size=8,
        max_length=16,
        init_r=3,
        target_r=1,
        save_every=4,
        eval_every=6,
        progress=False,
    )
    return FinetuneArgs(**{**base, **kw})


def test_tiny_classification_run_writes_a_peft_adapter(tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir / "bert")
    final = run_finetune(args)
    out = tmp_path / "run"
    assert 0.0 <= final["eval_accuracy"] <= 1.0 and final["step"] == 12
    assert latest_checkpoint(out).name == "checkpoint-8"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith(
        "step,loss,budget,active_rank,mean_score,ig_nodes,ig_residual,eval_accuracy"
    )
    assert (out / "rank_heatmap.png").is_file() and (out / "training_curves.png").is_file()

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("classifier.weight") for k in weights)
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(args.model), out
    )
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0


def test_resume_from_a_checkpoint_is_exact(tmp_path, tiny_model_dir):
    """Also in another folder, and with other --save-every / --eval-every (RESUME_FREE): those
    decide what is saved and evaluated, never a trained value."""
    full = tmp_path / "full"
    run_finetune(_args(full, tiny_model_dir / "bert"))
    part = tmp_path / "part"
    (part / "run").mkdir(parents=True)
    shutil.copytree(full / "run" / "checkpoint-4", part / "run" / "checkpoint-4")
    data = str(full / "train.jsonl")  # the same data file: --data decides the run
    free = dict(save_every=3, eval_every=5)
    run_finetune(_args(part, tiny_model_dir / "bert", resume=True, data=data, eval_data=data, **free))
    assert latest_checkpoint(part / "run").name == "checkpoint-9"
    a, b = (load_file(str(d / "run" / "igulora_state.safetensors")) for d in (full, part))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_causal_lm_run(tmp_path, tiny_model_dir):
    final = run_finetune(
        _args(tmp_path, tiny_model_dir / "gpt", task="causal-lm", save_every=0, eval_every=0)
    )
    assert final["eval_perplexity"] > 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.jsonl"], "data file missing.jsonl does not exist"),
        (["--task", "regression"], "--task 'regression' is not one of classification, causal-lm"),
        (["--text-column", "review"], "no column 'review'"),
        (["--model", "no-such-dir"], "--model: no-such-dir is neither a Hugging Face model folder"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, extra, message):
    write_sentiment_jsonl(tmp_path / "train.jsonl")
    argv = [
        "finetune",
        "--model",
        str(tiny_model_dir / "bert"),
        "--data",
        "train.jsonl",
        "--task",
        "classification",
        "--output-dir",
        "out",
        "--max-steps",
        "2",
        *extra,
    ]
    out = subprocess.run(
        [sys.executable, "-m", "igulora.cli", *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("igulora finetune: error: ") and message in lines[0], (
        out.stderr
    )


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from igulora.data import Example
    from igulora.finetune import Batches

    torch.manual_seed(0)
    words = ["good", "bad", "fine", "film", "plot", "actor", "scene"]
    examples = [  # distinct texts of random lengths
        Example(
            text=" ".join([words[k % 7], words[k // 7 % 7], words[k // 49]] + ["plot"] * int(n)), label=k % 2
        )
        for k, n in enumerate(torch.randint(0, 40, (203,)))
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "bert")
    plain, grouped = (
        Batches(
            examples,
            tokenizer,
            _args(tmp_path, tiny_model_dir / "bert", batch_size=2, max_length=64, group_by_length=g),
        )
        for g in (False, True)
    )
    assert plain.per_epoch == 101  # megabatches of 50, 50 and 1 batches
    for epoch in range(2):
        steps = range(epoch * 101, (epoch + 1) * 101)
        texts = [
            sorted(
                t for s in steps for t in tokenizer.batch_decode(b(s)["input_ids"], skip_special_tokens=True)
            )
            for b in (plain, grouped)
        ]
        assert texts[0] == texts[1] and len(set(texts[1])) == 202  # a reordering of the same epoch
        padded = [sum(b(s)["input_ids"].numel() for s in steps) for b in (plain, grouped)]
        assert padded[1] < 0.8 * padded[0], padded


def test_orth_reg_weight_reaches_the_config(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from igulora.finetune import igu_config

    args = _args(tmp_path, tiny_model_dir / "bert", orth_reg_weight=0.3, orth_reg_start="tinit")
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    config = igu_config(args, model)
    assert (config.orth_reg_weight, config.orth_reg_from) == (0.3, config.tinit) and config.tinit > 0
