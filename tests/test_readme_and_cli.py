"""The README's quickstart runs as written; the demo CLI recovers planted rank; .ci/run = README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from igulora.cli import main
from igulora.demo import PLANTED, recovery_score, run_demo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README has no code block after <!-- {marker} -->"
    return match.group(1)


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block_after("quickstart"), "README quickstart", "exec"), namespace)
    igu = namespace["igu"]
    assert sum(igu.active_ranks.values()) == 2 * len(igu.adapters)
    config = json.loads((tmp_path / "my-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_command():
    commands = [_block_after("main-command").strip(), _block_after("test-command").strip()]
    assert all(c.count("\n") == 0 and "pip install torch==2.13.0" in c for c in commands)
    assert commands[0].endswith("igulora demo") and commands[1].endswith("python -m pytest")
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_recovery_score():
    assert recovery_score(PLANTED, PLANTED) == 1.0
    assert recovery_score(PLANTED, {}) == 0.0
    half = {name: rank // 2 for name, rank in PLANTED.items()}
    assert recovery_score(PLANTED, half) == sum(half.values()) / sum(PLANTED.values())


def test_demo_prunes_to_the_budget_and_saves(tmp_path):
    result = run_demo(tmp_path, steps=30, batch_size=8, progress=False)
    assert sum(result.allocated.values()) == sum(PLANTED.values())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,budget,active_rank,mean_score" and len(lines) == 31
    assert (tmp_path / "rank_heatmap.png").stat().st_size > 0
    assert (tmp_path / "training_curves.png").stat().st_size > 0


def test_cli_demo_reports_planted_and_allocated(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "20", "--rule", "gradient"]) == 0
    out = capsys.readouterr().out
    assert "planted  allocated" in out and "recovery score" in out


def test_cli_rejects_bad_arguments(capsys):
    assert main(["demo", "--steps", "3"]) == 2
    assert "--steps must be >= 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--rule", "simpson"])


def test_cli_bench_runs_the_harness(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--ops", "copy", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["records"][0]["op"] == "copy"
    assert "copy" in capsys.readouterr().out
