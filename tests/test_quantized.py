"""bitsandbytes 4-bit (nf4, fp4) and 8-bit bases loaded by transformers (QLoRA-style), on CPU.

The closest exact property: a step on a quantized base is the step of the fp32 model whose
weights are the dequantized ones. 4-bit layers dequantize and multiply in the compute dtype, so
that holds to fp32 rounding; LLM.int8 also quantizes the activations, so 8-bit matches to its
own error only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, randomize_adapters, relative_error, step_gradients, tiny_llama

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
CONFIG = dict(
    init_r=3, target_r=1, total_step=6, tinit=1, tfinal=1, ig_every=2, ig_window=None, ig_fraction=0.5
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


def _quantized(path, kind):
    config = BitsAndBytesConfig(**QUANT[kind])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def _dequantized_weight(layer) -> torch.Tensor:
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127  # int8 with row absmax scales


def _igu(model, **overrides):
    igu = get_igu_model(model, IGULoraConfig(**{**CONFIG, **overrides}))
    randomize_adapters(igu, scale=0.1)
    return igu


@pytest.mark.parametrize("kind", list(QUANT))
def test_a_step_on_a_quantized_base_is_the_step_on_its_dequantized_weights(llama_dir, kind):
    quantized = _igu(_quantized(llama_dir, kind))
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    for name, layer in quantized.adapters.items():
        assert type(layer.base_layer).__module__.startswith("bitsandbytes")
        plain = reference_model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (plain.in_features, plain.out_features)
        with torch.no_grad():
            plain.weight.copy_(_dequantized_weight(layer.base_layer))
    reference = _igu(reference_model)
    batch = lm_batch()
    ours = step_gradients(quantized, batch, causal_lm_row_loss)
    expected = step_gradients(reference, batch, causal_lm_row_loss)
    tolerance = 1e-5 if kind != "int8" else 5e-2  # int8: activations are quantized too
    for result, exact in zip(ours, expected):
        assert relative_error(result, exact) < tolerance


def test_a_4bit_model_trains_to_its_budget_and_exports_for_the_unquantized_base(llama_dir, tmp_path):
    igu = _igu(_quantized(llama_dir, "nf4"), ig_every=1)
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-2)
    start = {n: p.detach().clone() for n, p in igu.named_parameters() if p.requires_grad}
    igu.train()
    for step in range(CONFIG["total_step"]):
        igu.training_loss(lm_batch(seed=step), causal_lm_row_loss).backward()
        optimizer.step()
        igu.update_and_allocate(step)
        optimizer.zero_grad()
    assert igu.allocator.num_updates == CONFIG["total_step"] - 1
    assert sum(igu.active_ranks.values()) == len(igu.adapters)  # target_r = 1 per module
    assert all(not torch.equal(p, start[n]) for n, p in igu.named_parameters() if p.requires_grad)

    igu.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path)
    exported = 0
    for name, layer in igu.adapters.items():
        module = loaded.base_model.model.get_submodule(name)
        if layer.active_rank == 0:  # pruned away: left out of the export
            assert not hasattr(module, "lora_A")
            continue
        torch.testing.assert_close(module.get_delta_weight("default"), layer.delta_weight().detach())
        exported += 1
    assert exported > 0


def test_merging_into_a_quantized_base_is_refused_naming_the_module(llama_dir):
    igu = _igu(_quantized(llama_dir, "nf4"))
    first = "model.layers.0.mlp.down_proj"
    with pytest.raises(RuntimeError, match=rf"module '{first}' has a quantized base \(Params4bit"):
        igu.merge_and_unload()
    layer = next(iter(igu.adapters.values()))
    with pytest.raises(RuntimeError, match=r"Linear4bit \(37 -> 24\) holds a quantized Params4bit"):
        layer.merge()
    assert not layer.merged
