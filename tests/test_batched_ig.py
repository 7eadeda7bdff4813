"""One batched forward/backward = the training gradient + the node-by-node IG estimate."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_llama, token_batch

from igulora import (
    IGULoraConfig,
    causal_lm_row_loss,
    get_igu_model,
    mean_loss,
    path_point,
    quadrature,
    sequence_classification_row_loss,
)
from igulora.ig import ADAPTER_PARAMS, adapter_parameters, batched_ig_loss, build_node_batch, set_row_plan

CASES = {  # (model, row loss, its trained head)
    "bert-classification": (tiny_bert, sequence_classification_row_loss, "classifier"),
    "llama-causal-lm": (tiny_llama, causal_lm_row_loss, "lm_head"),
}


def _igu(factory, head=None):
    config = IGULoraConfig(
        init_r=3, target_r=1, total_step=10, ig_window=None, modules_to_save=head and [head]
    )
    igu = get_igu_model(factory(torch.float64), config)
    randomize_adapters(igu)
    return igu


def _node_by_node_ig(igu, row_loss_fn, batch, node_batch):
    """The same estimate, one node at a time: alpha = 1 on the full batch, others on the sub-batch."""
    params = adapter_parameters(igu.model)
    sub_batch = {k: v[node_batch.ig_index] for k, v in batch.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for alpha, weight in node_batch.quadrature:
        with path_point(igu.model, alpha):
            loss = mean_loss(row_loss_fn)(igu.model, batch if alpha == 1.0 else sub_batch)
            grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads):
            total[name] += (weight / alpha) * p.detach() * g
    return total


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["trapezoid", "gauss_legendre", "gauss_lobatto", "stochastic"])
def test_batched_step_gives_training_grad_and_node_by_node_ig(case, rule):
    factory, row_loss_fn, head = CASES[case]
    igu = _igu(factory, head)  # the head trains too: the node rows must not reach its gradient
    batch = token_batch(n=5, t=6)
    if row_loss_fn is causal_lm_row_loss:
        del batch["labels"]  # next-token targets come from input_ids; pad the end of one row
        batch["attention_mask"][2, -2:] = 0
    gen = torch.Generator().manual_seed(4)
    quad = quadrature(rule, 3, grid=6, generator=gen)
    node_batch = build_node_batch(batch, quad, ig_fraction=0.5, generator=gen)
    assert node_batch.batch["input_ids"].shape[0] == 5 + 3 * sum(a < 1 for a in quad.alphas)

    loss, train_loss = batched_ig_loss(igu.model, row_loss_fn, node_batch)
    loss.backward()
    params = adapter_parameters(igu.model)
    trained = {n: p for n, p in igu.model.named_parameters() if p.requires_grad}
    assert len(trained) > len(params)
    batched_grads = {n: p.grad.clone() for n, p in trained.items()}
    batched_ig = {
        f"{name}.{p}": buf
        for name, layer in igu.adapters.items()
        for p, buf in zip(ADAPTER_PARAMS, layer.ig_buffers)
    }
    igu.zero_grad()
    set_row_plan(igu.model, None)

    plain = mean_loss(row_loss_fn)(igu.model, batch)
    plain.backward()
    torch.testing.assert_close(train_loss, plain, rtol=1e-13, atol=0)
    for name, p in trained.items():
        torch.testing.assert_close(batched_grads[name], p.grad, rtol=1e-11, atol=1e-14, msg=name)

    expected = _node_by_node_ig(igu, row_loss_fn, batch, node_batch)
    for name in params:
        torch.testing.assert_close(batched_ig[name], expected[name], rtol=1e-10, atol=1e-14)
    assert any(v.abs().sum() > 0 for v in expected.values())


def test_training_loss_uses_batched_ig_only_on_scoring_steps():
    config = IGULoraConfig(
        init_r=2, target_r=1, total_step=10, tfinal=2, ig_every=3, ig_window=None, ig_steps=2
    )
    igu = get_igu_model(tiny_bert(), config)
    batch = token_batch()
    scored = []
    for step in range(10):
        igu.training_loss(batch).backward()
        scored.append(next(iter(igu.adapters.values())).ig_buffers is not None)
        igu.update_and_allocate(step)
        igu.zero_grad()
    assert scored == [s % 3 == 0 and s < 8 for s in range(10)]


def test_a_scoring_step_loss_has_the_training_loss_value():
    igu = _igu(tiny_bert)
    igu.train()
    batch = token_batch()
    plain = mean_loss(sequence_classification_row_loss)(igu.model, batch)
    plain = plain + igu.igu_config.orth_reg_weight * igu.orthogonality_loss()  # the default's term
    loss = igu.training_loss(batch)
    assert igu.is_scoring_step() and igu.igu_config.orth_reg_weight > 0
    torch.testing.assert_close(loss, plain, rtol=1e-13, atol=0)
    loss.backward()
    assert any(bool(layer.ig_buffers[1].abs().sum() > 0) for layer in igu.adapters.values())
