"""Triton score update and triplet reduction (interpreter on CPU) against the eager reference."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_three_way, requires_cuda

pytest.importorskip("triton")
from igu_kernels import reference, score  # noqa: E402

KW = dict(beta1=0.85, beta2=0.7, eps=1e-6)


def _state(n, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64).to(device) for _ in range(3)]


def _update(impl, ig, ibar, ubar, mode):
    """One update on fp32 copies of the state; returns (score, Ibar, Ubar)."""
    ibar, ubar = ibar.float().clone(), ubar.float().clone()
    return impl.score_update(ig, ibar, ubar, score=mode, **KW), ibar, ubar


@pytest.mark.parametrize("n", [1, 33, 1025, 4097])
@pytest.mark.parametrize("mode", ["snr", "product", "stable_magnitude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_score_update_matches_reference(n, mode, dtype):
    ig, ibar, ubar = _state(n, seed=n)
    ig = (ig - 0.5).to(dtype)  # signed, as IG is
    exact_state = [ibar.clone(), ubar.clone()]
    exact = [reference.score_update(ig.double(), *exact_state, score=mode, **KW), *exact_state]
    eager = _update(reference, ig, ibar, ubar, mode)
    kernel = _update(score, ig, ibar, ubar, mode)
    for k, e, x in zip(kernel, eager, exact):
        assert_three_way(k, e, x)


def test_score_update_rejects_bad_state():
    ibar = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ibar must be a contiguous fp32"):
        score.score_update(torch.zeros(4), ibar, ibar.float(), score="snr", **KW)
    with pytest.raises(ValueError, match="shapes differ"):
        score.score_update(torch.zeros(5), torch.zeros(4), torch.zeros(4), score="snr", **KW)


@pytest.mark.parametrize("r, d_in, d_out", [(1, 33, 65), (5, 127, 33), (3, 1, 1)])
def test_triplet_scores_match_reference(r, d_in, d_out):
    g = torch.Generator().manual_seed(r)
    a, e, b = (torch.rand(*s, generator=g, dtype=torch.float64) for s in ((r, d_in), (r,), (d_out, r)))
    exact = reference.triplet_scores(a, e, b)
    assert_three_way(
        score.triplet_scores(a.float(), e.float(), b.float()),
        reference.triplet_scores(a.float(), e.float(), b.float()),
        exact,
    )


@requires_cuda
@pytest.mark.parametrize("mode", ["snr", "product", "stable_magnitude"])
def test_score_update_on_gpu(mode):
    ig, ibar, ubar = _state(1 << 20, seed=0, device="cuda")
    eager = _update(reference, ig.bfloat16(), ibar, ubar, mode)
    kernel = _update(score, ig.bfloat16(), ibar, ubar, mode)
    for k, e in zip(kernel, eager):
        torch.testing.assert_close(k, e, rtol=1e-6, atol=1e-6)
