"""Bad input never costs work or gives a silent wrong model (issue #34): each instance found by
probing, one test each; every error names the field, argument, module or file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lm_batch, randomize_adapters, tiny_bert, tiny_llama

from igulora import IGULoraConfig, IGUModel, causal_lm_row_loss, get_igu_model
from igulora.layer import IGULoraLinear


def _config(**overrides) -> IGULoraConfig:
    base = dict(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2)
    return IGULoraConfig(**{**base, **overrides})


def _adapters(model) -> int:
    return sum(isinstance(m, IGULoraLinear) for m in model.modules())


def test_a_budget_that_keeps_nothing_is_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(
        ValueError, match=r"IGULoraConfig\.target_r=0\.1: over 4 adapters it keeps no triplet"
    ):
        get_igu_model(model, _config(target_r=0.1))
    assert _adapters(model) == 0


def test_the_forgotten_allocation_guard_holds_in_eval_mode_after_loading(tmp_path):
    get_igu_model(tiny_llama(), _config()).save_pretrained(tmp_path)  # a save at step 0
    igu = IGUModel.from_pretrained(tiny_llama(), tmp_path)
    assert not igu.training  # from_pretrained keeps the base model's eval mode
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(RuntimeError, match=r"update_and_allocate\(\) was never called"):
        for _ in range(12):
            igu.training_loss(lm_batch(), causal_lm_row_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert igu._guard.steps == 1 + 1 + 1 + 1  # one past tinit + delta_t + 1


def _tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_merging_into_a_tied_lm_head_unties_it_and_matches_peft(tmp_path):
    from peft import PeftModel

    igu = get_igu_model(_tied_llama(), _config(target_modules=["lm_head", "q_proj"]))
    randomize_adapters(igu)
    batch = lm_batch()
    igu.eval()
    with torch.no_grad():
        adapted = igu(**batch).logits
        igu.save_pretrained(tmp_path)
        peft = PeftModel.from_pretrained(_tied_llama(), tmp_path).eval()(**batch).logits
        with pytest.warns(UserWarning, match="lm_head's weight was tied"):
            merged = igu.merge_and_unload()
        ours = merged(**batch).logits
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(peft, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, adapted, rtol=1e-5, atol=1e-5)


def test_wrapping_an_adapted_model_is_refused():
    from peft import LoraConfig, get_peft_model

    igu = get_igu_model(tiny_llama(), _config())
    with pytest.raises(ValueError, match="is an IGUModel already"):
        get_igu_model(igu, _config())
    with pytest.raises(ValueError, match="already has IGU-LoRA adapters"):
        get_igu_model(igu.model, _config())
    peft = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries PEFT adapters"):
        get_igu_model(peft, _config())
    with pytest.raises(ValueError, match="carries PEFT adapters"):
        get_igu_model(peft.base_model.model, _config())


def test_modules_to_save_overlapping_the_targets_is_refused():
    model = tiny_bert()
    # adapt the head and train it whole
    config = IGULoraConfig(
        target_modules=r".*(query|classifier)", modules_to_save=["classifier"], total_step=10
    )
    with pytest.raises(ValueError, match="'classifier' is selected by target_modules and.*modules_to_save"):
        get_igu_model(model, config)
    assert _adapters(model) == 0


def _bert_save(tmp_path, num_labels=3):
    config = IGULoraConfig(
        target_modules=["query"], modules_to_save=["classifier"], total_step=10, init_r=4, target_r=2
    )
    get_igu_model(tiny_bert(num_labels=num_labels), config).save_pretrained(tmp_path)


def test_loading_onto_another_head_size_names_the_file_and_changes_nothing(tmp_path):
    _bert_save(tmp_path, num_labels=3)
    model = tiny_bert(num_labels=2)
    with pytest.raises(ValueError, match=r"igulora_state\.safetensors: modules_to_save classifier\.weight"):
        IGUModel.from_pretrained(model, tmp_path)
    assert _adapters(model) == 0


def test_loading_a_save_with_an_edited_rank_names_the_file_and_changes_nothing(tmp_path):
    _bert_save(tmp_path)
    meta_file = tmp_path / "igulora_config.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["init_r"] = 6
    meta_file.write_text(json.dumps(meta))
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"igulora_config\.json: the config's init_r=6 but adapter"):
        IGUModel.from_pretrained(model, tmp_path)
    assert _adapters(model) == 0


def test_load_state_checks_the_trained_head_before_changing_anything(tmp_path):
    _bert_save(tmp_path, num_labels=3)
    config = IGULoraConfig(
        target_modules=["query"], modules_to_save=["classifier"], total_step=10, init_r=4, target_r=2
    )
    igu = get_igu_model(tiny_bert(num_labels=2), config)
    before = {n: p.detach().clone() for n, p in igu.named_parameters()}
    with pytest.raises(ValueError, match="modules_to_save classifier.weight"):
        igu.load_state(tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in igu.named_parameters())


@pytest.mark.parametrize(
    "batch, error, message",
    [
        (
            {"input_ids": torch.zeros(0, 7, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)},
            ValueError,
            "batch is empty",
        ),
        (
            {"input_ids": [[1, 2, 3], [4, 5, 6]], "labels": torch.tensor([0, 1])},
            TypeError,
            r"batch\['input_ids'\] is a list",
        ),
        (
            {"input_ids": torch.ones(3, 7, dtype=torch.long), "labels": torch.tensor([0, 1])},
            ValueError,
            "disagree on the batch size",
        ),
        ([torch.ones(3, 7)], TypeError, "batch must be a mapping"),
        (
            {
                "input_ids": torch.ones(2, 7, dtype=torch.long),
                "attention_mask": torch.ones(2, 5),  # the model would train on it silently
                "labels": torch.tensor([0, 1]),
            },
            ValueError,
            r"sequence length \(dim 1\): \{'input_ids': 7, 'attention_mask': 5\}",
        ),
    ],
    ids=["empty", "list-of-lists", "ragged", "not-a-mapping", "short-mask"],
)
@pytest.mark.parametrize("scoring", [True, False], ids=["scoring", "plain"])
def test_a_batch_that_cannot_be_one_is_named(batch, error, message, scoring):
    igu = get_igu_model(
        tiny_bert(), IGULoraConfig(target_modules=["query"], total_step=10, ig_every=1, ig_window=None)
    )
    igu.train()
    igu.step = 0 if scoring else 1
    igu._allocation_calls = igu.step
    igu.igu_config.ig_every = 1 if scoring else 2
    assert igu.is_scoring_step() == scoring
    with pytest.raises(error, match=message):
        igu.training_loss(batch)


def test_causal_lm_loss_takes_inputs_embeds_with_labels_and_names_what_is_missing():
    igu = get_igu_model(tiny_llama(), _config())
    batch = lm_batch()
    embeds = igu.model.get_input_embeddings()(batch["input_ids"])
    with_ids = causal_lm_row_loss(igu, {**batch, "labels": batch["input_ids"]})
    with_embeds = causal_lm_row_loss(
        igu,
        {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]},
    )
    torch.testing.assert_close(with_embeds[0], with_ids[0])
    with pytest.raises(ValueError, match="neither labels nor input_ids.*with inputs_embeds, pass labels"):
        causal_lm_row_loss(igu, {"inputs_embeds": embeds})
