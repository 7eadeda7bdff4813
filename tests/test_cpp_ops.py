"""C++ CPU ops (torch.ops.igulora.*) against the eager reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_three_way

from igu_kernels import cpp, reference

if not cpp.load():
    pytest.skip(f"C++ ops could not be built: {cpp.why_not()}", allow_module_level=True)

KW = dict(beta1=0.85, beta2=0.7, eps=1e-6)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(n, state_dtype, ig_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ig = (torch.randn(n, generator=g, dtype=torch.float64)).to(ig_dtype)
    ibar, ubar = (torch.rand(n, generator=g, dtype=torch.float64).to(state_dtype) for _ in range(2))
    return ig, ibar, ubar


def _update(impl, ig, ibar, ubar, mode):
    ibar, ubar = ibar.clone(), ubar.clone()
    return impl.score_update(ig, ibar, ubar, score=mode, **KW), ibar, ubar


@pytest.mark.parametrize("n", [0, 1, 33, 65537])
@pytest.mark.parametrize("mode", ["snr", "product", "stable_magnitude"])
@pytest.mark.parametrize(
    "state_dtype, ig_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_score_update_matches_reference(n, mode, state_dtype, ig_dtype, threads):
    ig, ibar, ubar = _inputs(n, state_dtype, ig_dtype, seed=n)
    exact = _update(reference, ig.double(), ibar.double(), ubar.double(), mode)
    eager = _update(reference, ig, ibar, ubar, mode)
    ours = _update(cpp, ig, ibar, ubar, mode)
    for o, e, x in zip(ours, eager, exact):
        assert o.dtype == state_dtype and o.shape == (n,)
        if n:
            assert_three_way(o, e, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["snr", "product", "stable_magnitude"])
def test_score_update_is_bitwise_eager(dtype, mode):
    ig, ibar, ubar = _inputs(100_001, dtype, dtype)
    for o, e in zip(_update(cpp, ig, ibar, ubar, mode), _update(reference, ig, ibar, ubar, mode)):
        assert torch.equal(o, e)


def test_score_update_inputs():
    ig, ibar, ubar = _inputs(64, torch.float32, torch.float32)
    out = torch.full_like(ibar, float("nan"))
    assert cpp.score_update(ig, ibar.clone(), ubar.clone(), score="snr", out=out, **KW) is out
    torch.testing.assert_close(out, _update(reference, ig, ibar, ubar, "snr")[0])
    wide = torch.stack([ig, ig], dim=1)
    torch.testing.assert_close(
        _update(cpp, wide[:, 0], ibar, ubar, "snr")[0], _update(cpp, ig, ibar, ubar, "snr")[0]
    )
    with pytest.raises(RuntimeError, match="ibar must be contiguous"):
        cpp.score_update(ig[:32], torch.stack([ibar, ibar], 1)[:32, 0], ubar[:32], score="snr", **KW)
    with pytest.raises(RuntimeError, match=r"ubar has shape \[63\] but ig has shape \[64\]"):
        cpp.score_update(ig, ibar, ubar[:63].clone(), score="snr", **KW)
    with pytest.raises(RuntimeError, match="ibar is Float but ubar is Double"):
        cpp.score_update(ig, ibar, ubar.double(), score="snr", **KW)


@pytest.mark.parametrize("r, d_in, d_out", [(1, 33, 65), (5, 127, 33), (7, 1, 1), (0, 9, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triplet_scores_match_reference(r, d_in, d_out, dtype, threads):
    g = torch.Generator().manual_seed(r)
    a, e, b = (torch.rand(*s, generator=g, dtype=torch.float64) for s in ((r, d_in), (r,), (d_out, r)))
    exact = reference.triplet_scores(a, e, b)
    a, e, b = a.to(dtype), e.to(dtype), b.to(dtype)
    ours = cpp.triplet_scores(a, e, b)
    assert ours.dtype == dtype and ours.shape == (r,)
    if r:
        assert_three_way(ours, reference.triplet_scores(a, e, b), exact)


def test_triplet_scores_inputs():
    a, e, b = torch.rand(3, 33), torch.rand(3), torch.rand(65, 3)
    expected = reference.triplet_scores(a, e, b)
    torch.testing.assert_close(
        cpp.triplet_scores(a.t().contiguous().t(), e, b.t().contiguous().t()), expected
    )
    zeros = cpp.triplet_scores(torch.zeros(3, 33), torch.zeros(3), torch.zeros(65, 3))  # all pruned
    assert torch.equal(zeros, torch.zeros(3))
    with pytest.raises(RuntimeError, match="rank mismatch"):
        cpp.triplet_scores(a, e[:2], b)


def test_ops_are_registered_with_fake_implementations():
    ibar = torch.empty(10, device="meta")
    assert torch.ops.igulora.score_update_(ibar, ibar, ibar, ibar, 0.9, 0.9, 1e-6, True) is None
    a = torch.empty(4, 7, device="meta")
    assert torch.ops.igulora.triplet_scores(
        a, torch.empty(4, device="meta"), torch.empty(5, 4, device="meta")
    ).shape == (4,)


def test_without_ninja_warns_once_and_falls_back(tmp_path):
    """A fresh process with nothing on PATH (no ninja, no compiler) and an empty cache."""
    code = (
        "import warnings, torch\n"
        "from igu_kernels import dispatch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    backends = dispatch.available_backends()\n"
        "    state = [torch.zeros(3), torch.zeros(3)]\n"
        "    dispatch.score_update(torch.ones(3), *state, beta1=0.5, beta2=0.5, score='snr', eps=1.0)\n"
        "print('cpp' in backends, len(w), w[0].message if w else '')\n"
    )
    env = {
        **os.environ,
        "PATH": str(tmp_path / "empty-bin"),
        "IGULORA_CPP_CACHE": str(tmp_path),
        "IGULORA_BACKEND": "auto",
    }
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False 1 igulora: C++ CPU ops unavailable (RuntimeError: Ninja is required")
