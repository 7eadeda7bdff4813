"""Gradient checkpointing: the batched IG step's .grad and IG buffers equal the step without it."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, randomize_adapters, step_gradients, tiny_bert, tiny_llama, token_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

from igulora import (
    IGULoraConfig,
    causal_lm_row_loss,
    get_igu_model,
    integrated_gradients,
    mean_loss,
    sequence_classification_row_loss,
)

CASES = {  # model, row loss, batch, trained head
    "llama": (tiny_llama, causal_lm_row_loss, lm_batch, None),
    "bert": (tiny_bert, sequence_classification_row_loss, token_batch, ["classifier"]),
}
CONFIG = dict(init_r=3, target_r=1, total_step=10, ig_every=2, ig_window=None, ig_fraction=0.5, ig_steps=3)


def _igu(model, head=None):
    igu = get_igu_model(model, IGULoraConfig(**CONFIG, modules_to_save=head))
    randomize_adapters(igu)
    return igu


def _assert_same(result, reference):
    for ours, expected in zip(result, reference):
        assert ours.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("scoring", [True, False], ids=["scoring", "plain"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", list(CASES))
def test_hf_gradient_checkpointing_gives_the_same_step(case, reentrant, scoring):
    factory, row_loss_fn, make_batch, head = CASES[case]
    batch = make_batch()
    reference = step_gradients(_igu(factory(torch.float64), head), batch, row_loss_fn, scoring)
    igu = _igu(factory(torch.float64), head)
    igu.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert igu.is_gradient_checkpointing
    checkpointed = step_gradients(igu, batch, row_loss_fn, scoring)
    _assert_same(checkpointed, reference)
    assert any(g.abs().sum() > 0 for g in checkpointed[0].values())


class _Blocks(nn.Module):
    """A plain residual MLP whose middle block runs under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool | None, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(61, width)
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.outer = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.reentrant = reentrant

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if self.reentrant is None:
            h = h + self.inner(h)
        else:
            h = h + checkpoint(self.inner, h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(self.outer(h)).mean(1))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_torch_checkpoint_around_a_block_gives_the_same_step(reentrant):
    def make(mode):
        torch.manual_seed(3)
        model = _Blocks(mode).double()
        # Reentrant checkpointing needs an input that requires grad (what HF's
        # enable_input_require_grads does for a frozen embedding).
        model.embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return _igu(model)

    batch = token_batch(n=6, t=5)
    reference = step_gradients(make(None), batch, sequence_classification_row_loss)
    checkpointed = step_gradients(make(reentrant), batch, sequence_classification_row_loss)
    _assert_same(checkpointed, reference)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_node_by_node_ig_under_checkpointing(reentrant):
    batch = lm_batch()
    loss_fn = mean_loss(causal_lm_row_loss)
    plain = integrated_gradients(_igu(tiny_llama(torch.float64)), loss_fn, batch, steps=3)
    igu = _igu(tiny_llama(torch.float64))
    igu.gradient_checkpointing_enable({"use_reentrant": reentrant})
    igu.train()
    result = integrated_gradients(igu, loss_fn, batch, steps=3)
    assert result.total != 0 and result.delta == pytest.approx(plain.delta, rel=1e-9)
    for name, value in plain.attributions.items():
        torch.testing.assert_close(result.attributions[name], value, rtol=1e-10, atol=1e-14)


def test_checkpointing_can_be_disabled_and_needs_a_model_that_has_it():
    igu = _igu(tiny_llama(torch.float64))
    igu.gradient_checkpointing_enable()
    igu.gradient_checkpointing_disable()
    assert not igu.is_gradient_checkpointing
    plain = _igu(_Blocks(None).double())
    with pytest.raises(TypeError, match="_Blocks has no activation_checkpointing_enable"):
        plain.gradient_checkpointing_enable()


def test_a_trained_module_inside_a_reentrant_checkpoint_is_an_error_not_a_wrong_gradient():
    model = _Blocks(reentrant=True).double()
    model.embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    config = IGULoraConfig(**{**CONFIG, "target_modules": ["outer"]}, modules_to_save=["inner.0"])
    igu = get_igu_model(model, config)
    randomize_adapters(igu)
    with pytest.raises(RuntimeError, match=r"\['model.inner.0.weight', 'model.inner.0.bias'\].*reentrant"):
        step_gradients(igu, token_batch(), sequence_classification_row_loss)
