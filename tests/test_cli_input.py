"""igulora finetune's input: every argument checked by its flag, the output folder and the labels
checked before the model is loaded, and every user error one line on stderr (issue #34)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import finetune_argv, write_sentiment_jsonl

import igulora.finetune as finetune
from igulora.cli import main
from igulora.data import DataError, Example, class_count, load_examples


def _argv(tmp_path, model_dir, *extra, data=None, output_dir=None):
    data = data or write_sentiment_jsonl(tmp_path / "train.jsonl")
    return finetune_argv(model_dir / "bert", data, output_dir or tmp_path / "out", *extra)


def _one_line_error(capsys, argv) -> str:
    """Run the CLI: it must exit 2 with exactly one line on stderr (besides transformers' weight
    loading bar), no traceback; that line."""
    code = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("igulora finetune: error: "), (code, err)
    return err[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the error must come before it."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(finetune, "load_model", load_model)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--max-length", "1"], "--max-length 1 must be >= 2"),
        (["--lr", "0"], "--lr 0.0 must be > 0"),
        (["--lr", "nan"], "--lr nan must be a finite number"),
        (["--warmup", "1"], "--warmup 1.0 must be in [0, 1)"),
        (["--init-r", "0"], "--init-r 0 must be >= 1"),
        (["--target-r", "0"], "--target-r 0.0 must be > 0"),
        (["--target-r", "4"], "--target-r 4.0 must be <= --init-r 3"),
        (["--lora-alpha", "0"], "--lora-alpha 0.0 must be > 0"),
        (["--save-every", "-1"], "--save-every -1 must be >= 0"),
        (["--eval-every", "-2"], "--eval-every -2 must be >= 0"),
        (["--ig-fraction", "1.5"], "--ig-fraction 1.5 must be in (0, 1]"),
        (["--ig-every", "0"], "--ig-every 0 must be >= 1"),
        (["--ig-steps", "0"], "--ig-steps 0: must be an integer >= 1"),
        (["--ig-tolerance", "0"], "--ig-tolerance 0.0 must be > 0"),
        (["--orth-reg-weight", "-1"], "--orth-reg-weight -1.0 must be >= 0"),
        (["--orth-reg-start", "9"], "--orth-reg-start 9: starts the orthogonality term at step 9"),
        (["--rule", "simpson"], "--rule 'simpson': must be one of"),
        (["--score", "loud"], "--score 'loud': must be one of"),
        (["--init", "zeros"], "--init 'zeros': must be one of"),
        (["--ig-steps", "auto", "--rule", "trapezoid"], "--ig-steps 'auto': 'auto' chooses Gauss-Legendre"),
        (["--encoding", "klingon"], "--encoding 'klingon' is not a known text encoding"),
        (["--data-format", "xml"], "--data-format 'xml' is not one of auto, jsonl"),
    ],
)
def test_every_bad_argument_is_one_line_naming_its_flag_before_anything(
    tmp_path, tiny_model_dir, capsys, no_model_load, extra, message
):
    line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir, *extra))
    assert message in line, line
    assert not (tmp_path / "out").exists()  # nothing created


def test_every_field_of_finetune_args_is_checked_by_its_flag(tiny_model_dir):
    """The class closed: a value of no sensible type in any field is a ValueError naming its flag."""
    from dataclasses import fields

    from igulora.finetune import FinetuneArgs, flag

    base = dict(model=str(tiny_model_dir / "bert"), data="d", task="classification", output_dir="o")
    base["max_steps"] = 5
    FinetuneArgs(**base)
    for field in fields(FinetuneArgs):
        with pytest.raises(ValueError, match="^" + flag(field.name) + " "):
            FinetuneArgs(**{**base, field.name: object()})


def test_a_max_length_beyond_the_model_positions_is_refused(tmp_path, tiny_model_dir, capsys):
    line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir, "--max-length", "600"))
    assert "--max-length 600 exceeds the 512 positions of --model" in line
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_a_target_r_that_keeps_nothing_fails_at_start_by_its_flag(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """0.01 ranks per layer over 13 adapters rounds to a budget of 0: get_igu_model refuses it,
    and the error reaches the user as one line naming --target-r, before any training step."""
    monkeypatch.setattr(finetune, "MetricsLogger", None)  # training would start with it
    line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir, "--target-r", "0.01"))
    assert "--target-r 0.01: over 13 adapters it keeps no triplet at all" in line, line
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, tiny_model_dir, capsys, no_model_load):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir, output_dir=out))
        assert f"--output-dir {out}: cannot write there" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tmp_path, tiny_model_dir, capsys, no_model_load):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir, output_dir=tmp_path / "ro" / "run"))
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert "cannot write there (Permission denied)" in line


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/x/adapter_model.safetensors"),
        OSError(28, "No space left on device"),
        ValueError("two\nlines"),
        finetune.FinetuneError("a run that failed"),
    ],
)
def test_the_cli_turns_each_user_error_into_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch, error):
    """Whatever run_finetune raises of these kinds, mid-run included, is one line and exit 2."""

    def fail(args):
        raise error

    monkeypatch.setattr(finetune, "run_finetune", fail)
    line = _one_line_error(capsys, _argv(tmp_path, tiny_model_dir))
    assert " ".join(str(error).split()) in line


def test_one_class_data_is_refused_by_its_label_column(tmp_path, tiny_model_dir, capsys, no_model_load):
    """Today: num_labels 1, a 1-output regression head trains and eval_accuracy reads 1."""
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": f"film {i}", "stars": 1}) + "\n" for i in range(16)))
    argv = _argv(tmp_path, tiny_model_dir, "--label-column", "stars", data=data)
    line = _one_line_error(capsys, argv)
    assert f"--label-column 'stars': {data} has one class (1); classification needs at least 2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "train, evals, message",
    [
        ([1, 2, 1, 2], [], r"has 1, 2 and lacks 0 \(1-based labels\? subtract 1\)"),
        ([0, 1, 3], [], "has 0, 1, 3 and lacks 2"),
        ([0, 1, -1], [], "label -1 is negative"),
        ([0, 1], [2], "dev.jsonl has label 2, which train.jsonl never has"),
        ([0, 0], [1], r"train.jsonl has one class \(0\)"),
    ],
)
def test_labels_must_be_class_indices(train, evals, message):
    as_examples = [[Example("x", label=v) for v in labels] for labels in (train, evals)]
    with pytest.raises(DataError, match=message):
        class_count(*as_examples, data="train.jsonl", eval_data="dev.jsonl")
    assert class_count([Example("x", label=v) for v in (0, 2, 1)]) == 3


@pytest.mark.parametrize("label", [1.5, True, "1.0"])
def test_a_label_that_is_not_an_integer_is_refused(tmp_path, label):
    """int() alone turned JSON's 1.5 into 1 and true into 1."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "label": label}) + "\n")
    with pytest.raises(DataError, match="is not an integer"):
        load_examples(tmp_path / "a.jsonl", task="classification")
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 2.0}\n')
    assert load_examples(tmp_path / "b.jsonl", task="classification")[0].label == 2
