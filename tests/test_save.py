"""Saving: a PEFT-loadable plain LoRA, igulora's own full state, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, token_batch

from igulora import IGULoraConfig, IGUModel, get_igu_model
from igulora.ig import ADAPTER_PARAMS
from igulora.io import atomic_write

peft = pytest.importorskip("peft")


def _trained_igu(factory, targets, **kw):
    model = factory()
    config = IGULoraConfig(target_modules=targets, init_r=4, target_r=2, total_step=10, **kw)
    igu = get_igu_model(model, config)
    randomize_adapters(igu)
    layers = list(igu.adapters.values())
    layers[0].rank_mask.copy_(torch.tensor([True, False, True, False]))
    layers[1].rank_mask.fill_(False)  # pruned to rank 0: left out of the PEFT export
    return igu


@pytest.mark.parametrize(
    "factory, targets, extra",
    [
        (tiny_bert, ["query", "value", "intermediate.dense"], dict(modules_to_save=["classifier"])),
        (tiny_gpt2, ["c_attn", "c_fc"], {}),
    ],
)
def test_peft_loads_the_export_and_gives_the_same_outputs(tmp_path, factory, targets, extra):
    igu = _trained_igu(factory, targets, **extra)
    if "modules_to_save" in extra:
        with torch.no_grad():
            igu.model.classifier.weight.add_(1.0)
    batch = token_batch()
    del batch["labels"]
    with torch.no_grad():
        expected = igu(**batch).logits
    igu.save_pretrained(tmp_path)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA"
    dropped = list(igu.adapters)[1]
    assert dropped not in peft_config["target_modules"]
    assert peft_config["rank_pattern"][list(igu.adapters)[0]] == 2

    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(factory()(**batch).logits, expected, atol=1e-4)


def test_from_pretrained_restores_masks_weights_and_allocator(tmp_path):
    igu = _trained_igu(tiny_bert, ["query", "value"], modules_to_save=["classifier"])
    for layer in igu.adapters.values():
        layer.ig_buffers = tuple(torch.randn_like(getattr(layer, p)) for p in ADAPTER_PARAMS)
    igu.allocator.update_scores()
    igu.step = 7
    with torch.no_grad():
        igu.model.classifier.bias.fill_(0.25)
    igu.save_pretrained(tmp_path)

    restored = IGUModel.from_pretrained(tiny_bert(), tmp_path)
    assert restored.rank_pattern == igu.rank_pattern and restored.step == 7
    assert restored.igu_config == igu.igu_config
    for name, t in igu.allocator.triplet_scores().items():
        torch.testing.assert_close(restored.allocator.triplet_scores()[name], t)
    batch = token_batch()
    del batch["labels"]
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).logits, igu(**batch).logits, rtol=0, atol=0)


def test_from_pretrained_rejects_another_base_model(tmp_path):
    _trained_igu(tiny_bert, ["query"]).save_pretrained(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    other = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"attention\.self\.query' is 32 -> 32 in this model but 24 -> 24"):
        IGUModel.from_pretrained(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an igulora save directory"):
        IGUModel.from_pretrained(tiny_bert(), tmp_path / "missing")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "file.json"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half-written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_merge_and_unload_gives_the_adapted_outputs_from_a_plain_model():
    igu = _trained_igu(tiny_bert, ["query", "value", "intermediate.dense"])
    batch = token_batch()
    del batch["labels"]
    with torch.no_grad():
        expected = igu(**batch).logits
        merged = igu.merge_and_unload()
        assert not any(type(m).__name__ == "IGULoraLinear" for m in merged.modules())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-6)
