"""Reliability: exact resume after SIGKILL, non-finite values, bad input that changes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    finetune_argv,
    randomize_adapters,
    short_run_config,
    tiny_bert,
    tiny_llama,
    token_batch,
    write_sentiment_jsonl,
)
from safetensors.torch import load_file

from igulora import IGULoraConfig, IGULoraLinear, IGUModel, get_igu_model
from igulora.cli import main
from igulora.finetune import FinetuneArgs, FinetuneError, run_finetune


def _finetune_cmd(model_dir, data, out, *extra):
    cli = finetune_argv(model_dir, data, out, "--save-every", "5", *extra, max_steps=60, batch_size=16)
    return [sys.executable, "-m", "igulora.cli", *cli]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl", n=160)
    model = tiny_model_dir / "bert"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_finetune_cmd(model, data, tmp_path / "full"), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _finetune_cmd(model, data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-15").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "final_metrics.json").exists()

    subprocess.run(_finetune_cmd(model, data, out, "--resume"), check=True, env=env, capture_output=True)
    for name in ("igulora_state.safetensors", "adapter_model.safetensors"):
        full, resumed = load_file(str(tmp_path / "full" / name)), load_file(str(out / name))
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(60))


def _short_run(model_dir, data, out, *extra):
    """``igulora finetune`` argv of a 12-step run, checkpoints every 4 steps."""
    argv = _finetune_cmd(model_dir, data, out, "--max-steps", "12", "--save-every", "4", "--batch-size", "8")
    return argv[3:] + ["--eval-data", str(data), *extra]  # after "python -m igulora.cli"


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("igulora finetune: error: "), (code, err)
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """(argv, folder) of a finished 12-step run: adapter, final_metrics.json, checkpoints 4 and 8."""
    root = tmp_path_factory.mktemp("finished")
    argv = _short_run(tiny_model_dir / "bert", write_sentiment_jsonl(root / "train.jsonl"), root / "run")
    assert main(argv) == 0
    assert (root / "run" / "final_metrics.json").is_file() and (root / "run" / "checkpoint-8").is_dir()
    return argv, root / "run"


def test_resume_with_other_arguments_refuses_naming_each_and_changes_nothing(finished_run, capsys):
    """Issue #34: this exited 0, put checkpoint-8's continuation over the finished adapter, cut
    metrics.csv and recorded an --init-r and --lr that were never used."""
    argv, out = finished_run
    before = _files(out)
    line = _error_line(capsys, [*argv, "--resume", "--max-steps", "6", "--init-r", "4", "--lr", "1e-3"])
    for differ in ("--max-steps: checkpoint 12, now 6", "--init-r: checkpoint 3, now 4", "--lr: checkpoint"):
        assert differ in line, line
    assert "--lr: checkpoint 0.005, now 0.001" in line and "nothing was changed" in line
    assert _files(out) == before


def test_resume_cannot_extend_a_finished_run(finished_run, capsys):
    argv, out = finished_run
    before = _files(out)
    line = _error_line(capsys, [*argv, "--resume", "--max-steps", "20"])
    assert "--max-steps: checkpoint 12, now 20" in line
    assert "train a longer one in another --output-dir" in line
    assert _files(out) == before


def test_a_run_without_resume_refuses_a_folder_that_holds_a_run(finished_run, capsys):
    argv, out = finished_run
    before = _files(out)
    line = _error_line(capsys, argv)
    assert f"--output-dir {out} holds a run already (args.json, final_metrics.json" in line
    assert "pass --resume" in line
    assert _files(out) == before


def test_resuming_a_finished_run_says_so_and_writes_nothing(finished_run, capsys):
    """--save-every, --eval-every and --no-progress may differ: they never change a trained value."""
    argv, out = finished_run
    before = _files(out)
    assert main([*argv, "--resume", "--save-every", "3", "--eval-every", "2"]) == 0
    captured = capsys.readouterr()
    assert "is finished already (step 12); nothing to do" in captured.err
    assert captured.out.startswith("step=12 loss=")
    assert _files(out) == before


def test_resume_from_a_checkpoint_with_other_arguments_refuses(finished_run, tmp_path, capsys):
    """An unfinished run: its checkpoint records the arguments it was trained with."""
    argv, out = finished_run
    shutil.copytree(out / "checkpoint-8", tmp_path / "run" / "checkpoint-8")
    before = _files(tmp_path / "run")
    moved = [str(tmp_path / "run") if a == str(out) else a for a in argv]
    line = _error_line(capsys, [*moved, "--resume", "--lr", "1e-3", "--group-by-length"])
    assert "(--group-by-length: checkpoint False, now True; --lr: checkpoint 0.005, now 0.001)" in line
    assert _files(tmp_path / "run") == before


def test_non_finite_steps_are_skipped_and_never_reach_the_emas():
    igu = get_igu_model(tiny_bert(), short_run_config(12))
    igu.train()
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.1)
    batch = token_batch()
    skipped = 0
    for step in range(12):
        loss = igu.training_loss(batch)
        if step in (3, 4):
            loss = loss * float("nan")  # a poisoned step: NaN loss, gradients and IG
        loss.backward()
        if igu.finite_step(loss):
            optimizer.step()
        else:
            skipped += 1
        with pytest.warns(RuntimeWarning, match="non-finite") if step in (3, 4) else _no_warning():
            igu.update_and_allocate(step)
        optimizer.zero_grad()
    assert skipped == 2 and igu.allocator.skipped_updates == 2
    assert all(torch.isfinite(t).all() for t in [*igu.allocator.ibar.values(), *igu.allocator.ubar.values()])
    assert all(torch.isfinite(p).all() for p in igu.parameters())
    assert sum(igu.active_ranks.values()) == 2 * len(igu.adapters)


class _no_warning:  # noqa: N801
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_run_of_only_non_finite_steps_is_an_error(tmp_path, tiny_model_dir, monkeypatch):
    import igulora.finetune as finetune

    def nan_loss(model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return logits.sum(-1) * float("nan"), torch.ones(logits.shape[0])

    monkeypatch.setattr(finetune, "sequence_classification_row_loss", nan_loss)
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    args = FinetuneArgs(
        model=str(tiny_model_dir / "bert"),
        data=str(data),
        task="classification",
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        batch_size=8,
        progress=False,
    )
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(FinetuneError, match="every one of the 4 steps had a non-finite"),
    ):
        run_finetune(args)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def _saved(tmp_path, **kw):
    igu = get_igu_model(
        tiny_bert(), IGULoraConfig(target_modules=["query"], init_r=3, target_r=1, total_step=5, **kw)
    )
    randomize_adapters(igu)
    igu.save_pretrained(tmp_path)
    return tmp_path


def _untouched(model) -> bool:
    return not any(isinstance(m, IGULoraLinear) for m in model.modules())


def test_loading_into_another_architecture_changes_nothing(tmp_path):
    save = _saved(tmp_path)
    llama = tiny_llama()
    with pytest.raises(
        ValueError, match=r"module 'bert\.encoder\.layer\.0\.attention\.self\.query' is not a Linear"
    ):
        IGUModel.from_pretrained(llama, save)
    assert _untouched(llama)


def test_loading_a_save_with_other_modules_changes_nothing(tmp_path):
    save = _saved(tmp_path)
    meta = (save / "igulora_config.json").read_text().replace('"query"', '"value"')
    (save / "igulora_config.json").write_text(meta)
    model = tiny_bert()
    with pytest.raises(ValueError, match="the config selects .*value.* but the save holds .*query"):
        IGUModel.from_pretrained(model, save)
    assert _untouched(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_is_a_clear_error_and_changes_nothing(tmp_path, damage):
    save = _saved(tmp_path)
    path = save / "igulora_state.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"igulora_state\.safetensors: cannot read the adapter state"):
        IGUModel.from_pretrained(model, save)
    assert _untouched(model)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "A": a["A"][:, :5]}, "x has 9 features on its last dim but A expects in=5"),
        (lambda a: {**a, "E": a["E"][:2]}, r"expected A \(r, in\), E \(r,\), B \(out, r\)"),
        (lambda a: {**a, "mask": torch.ones(3)}, "mask must be a bool tensor of shape"),
        (
            lambda a: {**a, "row_scale": torch.ones(5)},
            r"row_scale must have one entry per row of x \(dim 0 = 4\)",
        ),
        (lambda a: {**a, "x": a["x"].to("meta")}, "tensors are on different devices"),
        (lambda a: {**a, "x": a["x"].long()}, "x must be floating point"),
    ],
)
def test_kernel_inputs_are_checked(change, message):
    from igu_kernels import batched_ig_lora_delta

    args = {
        "x": torch.randn(4, 2, 9),
        "A": torch.randn(3, 9),
        "E": torch.randn(3),
        "B": torch.randn(7, 3),
        "mask": None,
        "row_scale": torch.ones(4),
    }
    a = change(args)
    with pytest.raises(ValueError, match=message):
        batched_ig_lora_delta(
            a["x"], a["A"], a["E"], a["B"], a["mask"], 1.0, a["row_scale"], torch.ones(4), torch.ones(4), None
        )
