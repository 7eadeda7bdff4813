"""End to end on real data: igulora finetune of pretrained MiniLM on SST-2 reaches >= 85% dev accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

SST2 = SHARED_DATA / "sst2"


@pytest.mark.slow
@pytest.mark.skipif(not SST2.is_dir(), reason=f"{SST2} is absent (the shared data sets sit beside the repo)")
def test_minilm_sst2_reaches_85_percent(tmp_path, minilm_path):
    argv = [
        "finetune",
        "--model",
        str(minilm_path),
        "--task",
        "classification",
        "--data",
        str(SST2 / "stsa.binary.train"),
        "--eval-data",
        str(SST2 / "stsa.binary.dev"),
        "--data-format",
        "label-text",
        "--exclude-modules",
        "pooler.dense",
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "434",  # two epochs: at one, seed 0 of the defaults gave 0.841 (the spread is about +-0.015)
        "--seed",
        "0",
        "--no-progress",  # everything else: the library's defaults
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "igulora.cli", *argv], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["eval_accuracy"] >= 0.85, final
    assert (tmp_path / "adapter_model.safetensors").is_file()
