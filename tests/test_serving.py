"""Adapters that serve: vLLM's loading rules (reimplemented here, independently of
igulora.integrations.export), the uniform-rank layout, and save_for_serving's refusal."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import randomize_adapters, smollm2, tiny_llama, token_batch

from igulora import IGULoraConfig, get_igu_model
from igulora.integrations.export import (
    required_max_lora_rank,
    save_for_serving,
    save_uniform,
    uniform_export,
    vllm_problems,
)

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _keys_naming(patterns: dict, module: str) -> list[str]:
    """PEFT's get_pattern_key rule, written out: a key names ``module`` when ``(.*\\.)?(key)$``
    matches the whole module name from its start."""
    return [key for key in patterns if re.match(rf"(.*\.)?({key})$", module)]


def _assert_vllm_serves(config: dict, tensors: dict, modules: list[str], max_lora_rank: int) -> None:
    """What vLLM's PEFT loader requires, and what makes its outputs those of PEFT."""
    ranks, alphas = config["rank_pattern"], config["alpha_pattern"]
    assert type(config["r"]) is int and config["r"] > 0
    assert all(type(v) is int and v > 0 for v in ranks.values())
    assert max([config["r"], *ranks.values()]) <= max_lora_rank and max_lora_rank in VLLM_RANKS
    assert set(config["modules_to_save"] or ()) <= {"classifier", "score"}
    assert not config.get("use_dora") and not config.get("lora_bias") and config["bias"] == "none"
    assert config["lora_alpha"] / config["r"] == 1  # vLLM's one scale ...
    adapted = set(ranks)
    for module in modules:  # every module of the model: its own key or, pruned, none at all
        own = [module] if module in adapted else []
        assert _keys_naming(ranks, module) == own, module
        assert _keys_naming(alphas, module) == own, module
        # PEFT's target_modules list rule: the exact name or a ".name" suffix
        assert any(module == t or module.endswith(f".{t}") for t in config["target_modules"]) == bool(own)
    for module, rank in ranks.items():  # ... is each module's scale; vLLM takes ranks from shapes
        assert alphas[module] / rank == 1
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
        assert tensors[f"base_model.model.{module}.lora_B.weight"].shape[1] == rank


def _set_masks(igu, kept: list[int], seed: int = 0) -> dict[str, int]:
    """Keep ``kept[i]`` ranks (chosen at random) of the i-th adapter; its rank by module name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, layer in zip(kept, igu.adapters.values()):
            mask = torch.zeros(layer.init_r, dtype=torch.bool)
            mask[torch.randperm(layer.init_r, generator=g)[:k]] = True
            layer.rank_mask.copy_(mask)
    return dict(zip(igu.adapters, kept))


@pytest.fixture(scope="module")
def smollm2_igu():
    model, _ = smollm2()
    config = IGULoraConfig(
        target_modules="all-linear", init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2
    )
    igu = get_igu_model(model, config)
    randomize_adapters(igu)
    g = torch.Generator().manual_seed(1)
    kept = dict(zip(igu.adapters, torch.randint(0, 5, (len(igu.adapters),), generator=g).tolist()))
    for projection in PROJECTIONS:  # layers 1 and 11: names a loose pattern key could confuse
        block = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        kept[f"model.layers.1.{block}.{projection}"] = 1
        kept[f"model.layers.11.{block}.{projection}"] = 3
    _set_masks(igu, list(kept.values()))
    return igu


def test_smollm2_export_passes_vllm_rules(smollm2_igu, tmp_path):
    igu = smollm2_igu
    modules = list(igu.adapters)
    assert len(modules) == 30 * 7
    ranks = {n: int(layer.rank_mask.sum()) for n, layer in igu.adapters.items()}
    assert set(ranks.values()) == {0, 1, 2, 3, 4}
    assert ranks["model.layers.1.mlp.up_proj"] != ranks["model.layers.11.mlp.up_proj"]

    save_for_serving(igu, tmp_path, max_lora_rank=8)
    config = json.loads((tmp_path / "adapter_config.json").read_text())  # as vLLM reads it
    tensors = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r}
    required = min(v for v in VLLM_RANKS if v >= max(ranks.values()))
    assert required == required_max_lora_rank(config) == 8
    _assert_vllm_serves(config, tensors, modules, required)
    assert vllm_problems(config, required) == []

    # PEFT itself (on a weightless copy of the model) gives every module its rank and scale 1
    with torch.device("meta"):
        skeleton = type(igu.model)(igu.model.config)
    fields = {k: v for k, v in config.items() if k in peft.LoraConfig.__dataclass_fields__}
    fields.pop("peft_type")
    skeleton = peft.inject_adapter_in_model(peft.LoraConfig(**fields), skeleton, low_cpu_mem_usage=True)
    got = {
        name: (module.r["default"], module.scaling["default"])
        for name, module in skeleton.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert got == {n: (r, 1.0) for n, r in ranks.items() if r}


BASE = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 4,
    "target_modules": ["model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj"],
    "rank_pattern": {"model.layers.1.mlp.up_proj": 2, "model.layers.11.mlp.up_proj": 4},
    "alpha_pattern": {"model.layers.1.mlp.up_proj": 2, "model.layers.11.mlp.up_proj": 4},
    "modules_to_save": None,
    "bias": "none",
    "use_dora": False,
    "use_rslora": False,
}
UP_1 = "model.layers.1.mlp.up_proj"


def _with(**changes) -> dict:
    return {**BASE, **changes}


@pytest.mark.parametrize(
    "config, max_lora_rank, expected",
    [
        (_with(r=4.0), 8, r"r = 4\.0 is not a positive int"),
        (_with(r=True), 8, r"r = True is not a positive int"),
        (
            _with(rank_pattern={**BASE["rank_pattern"], UP_1: "2"}),
            8,
            r"rank_pattern\[.*\] = '2' is not a positive",
        ),
        (_with(rank_pattern={**BASE["rank_pattern"], UP_1: 0}), 8, r"up_proj'\] = 0 is not a positive int"),
        (_with(lora_alpha=0), 8, r"lora_alpha = 0 is not a positive number"),
        ({k: v for k, v in BASE.items() if k != "lora_alpha"}, 8, r"missing required field 'lora_alpha'"),
        (BASE, 1, r"rank 4 is above max_lora_rank 1: serve with --max-lora-rank 8"),
        (BASE, 4, r"max_lora_rank 4 is not one vLLM accepts"),
        (_with(r=600, lora_alpha=600), None, r"rank 600 is above 512"),
        (
            _with(modules_to_save=["classifier", "lm_head"]),
            8,
            r"modules_to_save \['lm_head'\]: vLLM loads only",
        ),
        (_with(use_dora=True), 8, r"use_dora is set: vLLM does not serve DoRA"),
        (_with(bias="all"), 8, r"bias = 'all'"),
        (_with(peft_type="LOHA"), 8, r"peft_type 'LOHA' is not LORA"),
        (
            _with(rank_pattern={"layers.1.mlp.up_proj": 2, **BASE["rank_pattern"]}),
            8,
            r"module 'model\.layers\.1\.mlp\.up_proj' matches 2 rank_pattern keys",
        ),
        (
            _with(alpha_pattern={"up_proj": 4, **BASE["alpha_pattern"]}),
            8,
            r"matches 2 alpha_pattern keys \['up_proj', 'model\.layers\.1\.mlp\.up_proj'\]",
        ),
        (
            _with(target_modules=["blocks.0.ff(1)"], rank_pattern={"blocks.0.ff(1)": 2}, alpha_pattern={}),
            8,
            r"rank_pattern key 'blocks\.0\.ff\(1\)' does not select its own module",
        ),
        (_with(rank_pattern={"blocks.0.ff(": 2}), 8, r"not a valid regular expression"),
        (
            _with(alpha_pattern={**BASE["alpha_pattern"], UP_1: 4}),
            8,
            r"'model\.layers\.1\.mlp\.up_proj' has LoRA scale 2 but lora_alpha / r gives 1",
        ),
    ],
)
def test_vllm_problems_names_each_bad_case(config, max_lora_rank, expected):
    assert vllm_problems(BASE, 8) == []
    problems = vllm_problems(config, max_lora_rank)
    assert any(re.search(expected, p) for p in problems), problems


def test_vllm_problems_accepts_what_vllm_serves():
    # a suffix key is no capture: "layers.1.mlp.up_proj" does not name "model.layers.11.mlp.up_proj"
    config = _with(
        rank_pattern={"layers.1.mlp.up_proj": 2, "model.layers.11.mlp.up_proj": 4},
        alpha_pattern={"layers.1.mlp.up_proj": 2, "model.layers.11.mlp.up_proj": 4},
    )
    assert vllm_problems(config, 8) == []
    assert vllm_problems(_with(modules_to_save=["score"]), 8) == []
    assert vllm_problems(_with(rank_pattern={}, alpha_pattern={}, lora_alpha=8), 16) == []  # one scale 2


@pytest.mark.parametrize(
    "rank, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (321, 512), (512, 512)]
)
def test_required_max_lora_rank_rounds_up_to_a_vllm_value(rank, expected):
    assert required_max_lora_rank({"r": 1, "rank_pattern": {"a": rank}}) == expected
    assert required_max_lora_rank({"r": rank}) == expected


def test_required_max_lora_rank_refuses_what_vllm_cannot_serve():
    with pytest.raises(ValueError, match="rank 513 is above 512"):
        required_max_lora_rank({"r": 513})
    with pytest.raises(ValueError, match="no positive integer rank"):
        required_max_lora_rank({"r": 0})


def _tiny_igu():
    config = IGULoraConfig(
        target_modules="all-linear", init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2
    )
    igu = get_igu_model(tiny_llama(torch.float64), config)
    randomize_adapters(igu)
    kept = [4, 1, 0, 3, 2, 2, 1, 4, 3, 0, 2, 1, 3, 2][: len(igu.adapters)]
    return igu, _set_masks(igu, kept)


def test_uniform_export_serves_the_same_outputs_in_peft(tmp_path):
    igu, ranks = _tiny_igu()
    assert len(ranks) == 14 and 0 in ranks.values()
    batch = token_batch()
    del batch["labels"]
    with torch.no_grad():
        expected = igu(**batch).logits

    config, tensors = uniform_export(igu)
    peft_config, peft_tensors = igu.peft_export()
    assert (
        config["r"] == config["lora_alpha"] == 4 and config["rank_pattern"] == config["alpha_pattern"] == {}
    )
    assert (
        config["target_modules"] == peft_config["target_modules"] == sorted(n for n, r in ranks.items() if r)
    )
    assert tensors.keys() == peft_tensors.keys()  # pruned-to-zero modules are left out of both layouts
    for name, rank in ranks.items():
        a, b = (f"base_model.model.{name}.lora_{x}.weight" for x in "AB")
        if not rank:
            assert a not in tensors
            continue
        assert tensors[a].shape[0] == tensors[b].shape[1] == 4
        assert torch.equal(tensors[a][:rank], peft_tensors[a]) and not tensors[a][rank:].any()
        assert torch.equal(tensors[b][:, :rank], peft_tensors[b]) and not tensors[b][:, rank:].any()
    assert vllm_problems(config, 8) == []

    save_uniform(igu, tmp_path / "uniform")
    save_for_serving(igu, tmp_path / "pattern")
    logits = {}
    for layout in ("uniform", "pattern"):
        loaded = peft.PeftModel.from_pretrained(tiny_llama(torch.float64), tmp_path / layout).eval()
        with torch.no_grad():
            logits[layout] = loaded(**batch).logits
    # zero padding is exact: the two layouts agree to fp64 rounding
    torch.testing.assert_close(logits["uniform"], logits["pattern"], rtol=0, atol=1e-10)
    # the export stores fp32 weights: against the fp64 IGU model, fp32 rounding
    torch.testing.assert_close(logits["uniform"], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(tiny_llama(torch.float64)(**batch).logits, expected, atol=1e-3)


def test_save_for_serving_refuses_and_writes_nothing(tmp_path):
    igu, _ = _tiny_igu()
    target = tmp_path / "adapter"
    for layout in ("rank_pattern", "uniform"):
        with pytest.raises(
            ValueError, match=r"rank 4 is above max_lora_rank 1: serve with --max-lora-rank 8"
        ):
            save_for_serving(igu, target, layout=layout, max_lora_rank=1)
    assert not target.exists()
    with pytest.raises(ValueError, match="layout must be"):
        save_for_serving(igu, target, layout="padded")
    save_for_serving(igu, target, layout="uniform", max_lora_rank=8)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
