"""get_igu_model: target matching, freezing, modules_to_save, errors, real and tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch

from igulora import IGULoraConfig, IGULoraLinear, get_igu_model
from igulora.ig import ADAPTER_PARAMS
from igulora.model import name_matches


def _config(**kw):
    return IGULoraConfig(init_r=2, target_r=1, total_step=10, **kw)


def test_name_matching_rules():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", r".*\.0\..*q_proj")
    assert not name_matches("model.layers.10.self_attn.q_proj", r".*\.0\..*q_proj")  # full match only


@pytest.mark.parametrize(
    "factory, targets, expected",
    [
        (tiny_llama, ["q_proj", "v_proj"], 4),
        (tiny_llama, "all-linear", 2 * 7),
        (tiny_gpt2, ["c_attn"], 2),
        (tiny_gpt2, "all-linear", 2 * 4),
        (tiny_bert, ["attention.self.query"], 2),
        (tiny_bert, r"bert\.encoder\.layer\.1\..*", 6),
    ],
)
def test_injection_targets_and_identity(factory, targets, expected):
    model = factory()
    batch = token_batch()
    del batch["labels"]
    with torch.no_grad():
        before = model(**batch).logits
    igu = get_igu_model(model, _config(target_modules=targets))
    assert len(igu.adapters) == expected
    assert all(isinstance(m, IGULoraLinear) for m in igu.adapters.values())
    assert not any(n.endswith(("lm_head", "classifier")) for n in igu.adapters)
    with torch.no_grad():
        assert torch.equal(igu(**batch).logits, before)
    trainable = {n for n, p in igu.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ADAPTER_PARAMS for n in trainable)


def test_exclude_and_modules_to_save():
    igu = get_igu_model(
        tiny_bert(),
        _config(
            target_modules=["query", "value"],
            exclude_modules=r".*layer\.0\..*",
            modules_to_save=["classifier"],
        ),
    )
    assert sorted(igu.adapters) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    trainable = {n for n, p in igu.named_parameters() if p.requires_grad}
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    assert "model.bert.embeddings.word_embeddings.weight" not in trainable


def test_no_match_lists_candidates():
    with pytest.raises(ValueError, match=r"matched no Linear/Conv1D.*'q_proj'"):
        get_igu_model(tiny_llama(), _config(target_modules=["query"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        get_igu_model(tiny_llama(), _config(target_modules=["q_proj"], modules_to_save=["head"]))


def test_gpt2_conv1d_adapters_train():
    igu = get_igu_model(tiny_gpt2(), _config(target_modules=["c_attn", "c_proj"], init="lora"))
    assert all(layer.fan_in_fan_out for layer in igu.adapters.values())
    batch = token_batch()
    del batch["labels"]
    from igulora import causal_lm_row_loss, mean_loss

    mean_loss(causal_lm_row_loss)(igu, batch).backward()
    grads = [layer.lora_B.grad for layer in igu.adapters.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_pretrained_minilm_offline(minilm_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    batch = dict(tokenizer(["a fine film", "dull and far too long"], return_tensors="pt", padding=True))
    with torch.no_grad():
        before = model(**batch).logits
    config = _config(
        target_modules=["query", "key", "value", "dense"],
        exclude_modules=["pooler.dense"],
        modules_to_save=["classifier"],
    )
    igu = get_igu_model(model, config)
    assert len(igu.adapters) == 6 * 6
    with torch.no_grad():
        assert torch.equal(igu(**batch).logits, before)
    n_trainable = sum(p.numel() for p in igu.parameters() if p.requires_grad)
    assert 0 < n_trainable < 0.05 * sum(p.numel() for p in igu.parameters())


def test_a_scoring_window_scores_only_before_reallocations_and_trains_the_same_parameters():
    """ig_window: the EMAs update only on its steps, and since a scoring step's training gradient
    is the plain step's, the parameters (fp64) equal the every-second-step run's until masks differ."""
    window = dict(tinit=4, tfinal=6, delta_t=4)  # the defaults: ig_every=1, ig_window=2
    every_second = dict(window, ig_every=2, ig_window=None)  # the defaults until issue #35.2
    runs = {}
    for name, extra in {"window": window, "every-second": every_second}.items():
        torch.manual_seed(0)
        config = IGULoraConfig(
            target_modules=["query", "value"], init_r=2, target_r=1, total_step=20, **extra
        )
        igu = get_igu_model(tiny_bert(torch.float64), config)
        optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.1)
        scored = []
        for step in range(9):  # the first reallocation is at step 8: masks are equal until then
            batch = token_batch(n=4, t=6, seed=step)
            scored.append(igu.is_scoring_step())
            igu.training_loss(batch).backward()
            optimizer.step()
            igu.update_and_allocate(step)
            optimizer.zero_grad()
        runs[name] = igu, scored
    igu, scored = runs["window"]
    assert [s for s, on in enumerate(scored) if on] == [7, 8]
    assert igu.allocator.num_updates == 2 and runs["every-second"][0].allocator.num_updates == 5
    for (name, p), q in zip(igu.named_parameters(), runs["every-second"][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
