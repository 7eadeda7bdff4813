"""IGULoraLinear: exact identity at init, merge/unmerge, masks, Conv1D and low-precision bases."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from torch import nn

from igulora import IGULoraLinear


def _conv1d(d_in, d_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(d_out, d_in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["adalora", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_base_layer_exactly_at_init(kind, init, dtype):
    torch.manual_seed(0)
    base = (nn.Linear(33, 17) if kind == "linear" else _conv1d(33, 17)).to(dtype)
    x = torch.randn(3, 5, 33).to(dtype)
    expected = base(x)
    layer = IGULoraLinear(base, r=4, lora_alpha=8, init=init)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.dtype == torch.float32 and layer(x).dtype == dtype
    assert layer.scaling == 8 / 4


def test_shapes_and_attributes():
    layer = IGULoraLinear(nn.Linear(33, 17), r=5, lora_alpha=10, lora_dropout=0.1)
    assert layer.lora_A.shape == (5, 33) and layer.lora_E.shape == (5,) and layer.lora_B.shape == (17, 5)
    assert layer.rank_mask.dtype == torch.bool and layer.active_rank == 5
    assert isinstance(layer.dropout, nn.Dropout)
    layer.rank_mask[1:3] = False
    assert layer.active_rank == 3 and "active_rank=3" in repr(layer)


def test_forward_is_the_svd_form_and_ignores_masked_ranks():
    torch.manual_seed(0)
    layer = IGULoraLinear(nn.Linear(9, 7).double(), r=3, lora_alpha=6)
    randomize_adapters(layer)
    layer.rank_mask[1] = False
    x = torch.randn(4, 9, dtype=torch.float64)
    m = layer.rank_mask.double()
    expected = (
        layer.base_layer(x) + 2.0 * x @ (layer.lora_B @ torch.diag(layer.lora_E * m) @ layer.lora_A).t()
    )
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        layer.lora_E[1] = 123.0  # a masked rank has no effect
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_adapter_matches_linear_adapter():
    torch.manual_seed(0)
    linear = nn.Linear(9, 7).double()
    conv = _conv1d(9, 7).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    a, b = IGULoraLinear(linear, r=3, lora_alpha=3), IGULoraLinear(conv, r=3, lora_alpha=3)
    randomize_adapters(a)
    b.load_state_dict({k: v.t() if k == "base_layer.weight" else v for k, v in a.state_dict().items()})
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    base = nn.Linear(33, 17) if kind == "linear" else _conv1d(33, 17)
    layer = IGULoraLinear(base, r=4, lora_alpha=8)
    randomize_adapters(layer)
    layer.rank_mask[0] = False
    x = torch.randn(6, 33)
    original = base.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.weight, original)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged)


def test_bf16_base_keeps_fp32_adapter_math():
    torch.manual_seed(0)
    base32 = nn.Linear(33, 17)
    layer = IGULoraLinear(nn.Linear(33, 17).bfloat16(), r=4, lora_alpha=8)
    base32.load_state_dict(layer.base_layer.float().state_dict())
    layer.base_layer.bfloat16()
    randomize_adapters(layer)
    x = torch.randn(5, 33).bfloat16()
    delta = layer(x).float() - layer.base_layer(x).float()
    exact = 2.0 * x.float() @ (layer.lora_B @ torch.diag(layer.lora_E) @ layer.lora_A).t()
    # only the final add happens in bf16: error within a few bf16 ulps of the output
    assert (delta - exact).abs().max() <= 4 * 2**-8 * layer(x).float().abs().max()
    loss = layer(x).float().sum()
    loss.backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


def test_rejects_other_modules():
    with pytest.raises(TypeError, match="Conv2d"):
        IGULoraLinear(nn.Conv2d(3, 3, 1), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="r=0"):
        IGULoraLinear(nn.Linear(3, 3), r=0, lora_alpha=2)
