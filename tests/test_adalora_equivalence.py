"""With the gradient rule and the product score, igulora is AdaLoRA: same masks as PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, token_batch

from igulora import IGULoraConfig, get_igu_model

peft = pytest.importorskip("peft")

TARGETS = ["query", "value", "intermediate.dense"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=16, beta1=0.85, beta2=0.85)


def _peft_model(orth):
    model = tiny_bert(torch.float64, seed=1)
    cfg = peft.AdaLoraConfig(
        task_type="SEQ_CLS",
        target_modules=TARGETS,
        lora_alpha=8,
        lora_dropout=0.0,
        deltaT=2,
        orth_reg_weight=orth,
        **SCHEDULE,
    )  # SEQ_CLS: PEFT adds the regulariser in this forward and trains the classifier
    return peft.get_peft_model(model, cfg)


def _igu_model_like(peft_model, orth):
    model = tiny_bert(torch.float64, seed=1)
    config = IGULoraConfig(
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        lora_alpha=8,
        delta_t=2,
        ig_rule="gradient",
        score="product",
        prune_mode="zero",
        orth_reg_weight=orth / 2,  # PEFT averages over matrices, method.md over adapters
        orth_reg_ranks="all",  # PEFT's term reaches every rank
        **SCHEDULE,
    )
    igu = get_igu_model(model, config)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in igu.adapters.items():
            src = peft_layers[name]
            layer.lora_A.copy_(src.lora_A["default"])
            layer.lora_E.copy_(src.lora_E["default"].view(-1))
            layer.lora_B.copy_(src.lora_B["default"])
            # PEFT scales by lora_alpha / (ranknum + 1e-5); match it to the last bit.
            layer.scaling = src.scaling["default"] / (src.ranknum["default"].item() + 1e-5)
    return igu


def _peft_pattern(peft_model):
    pattern = peft_model.peft_config["default"].rank_pattern
    return {k.removesuffix(".lora_E.default"): list(v) for k, v in pattern.items()}


def test_gradient_rule_with_product_score_reproduces_peft_adalora_masks():
    torch.manual_seed(0)
    orth = 0.2
    ref = _peft_model(orth)
    igu = _igu_model_like(ref, orth)
    # PEFT leaves ranknum trainable; it is a constant of the method, so keep it out of the optimizer.
    ref_params = [p for n, p in ref.named_parameters() if p.requires_grad and "ranknum" not in n]
    ref_opt = torch.optim.AdamW(ref_params, lr=2e-2)
    igu_opt = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=2e-2)
    assert len(ref_opt.param_groups[0]["params"]) == len(igu_opt.param_groups[0]["params"])

    allocations = 0
    for step in range(SCHEDULE["total_step"]):
        batch = token_batch(n=6, t=9, seed=100 + step)
        before = ref.peft_config["default"].rank_pattern
        ref_loss = ref(**batch).loss
        ref_loss.backward()
        ref_opt.step()
        ref.base_model.update_and_allocate(step)
        ref_opt.zero_grad()

        loss = igu.training_loss(batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        loss.backward()
        igu_opt.step()
        pattern = igu.update_and_allocate(step)
        igu_opt.zero_grad()

        reallocated = ref.peft_config["default"].rank_pattern is not before
        assert (pattern is not None) == reallocated, f"step {step}: allocation steps differ"
        if reallocated:
            allocations += 1
            assert pattern == _peft_pattern(ref), f"step {step}: masks differ from PEFT AdaLoRA"
    total = sum(len(v) for v in igu.rank_pattern.values())
    kept = sum(sum(v) for v in igu.rank_pattern.values())
    assert allocations >= 4
    assert kept == SCHEDULE["target_r"] * len(igu.adapters) < total
