"""The tuned launch path of the Triton kernels, run in the interpreter with fake timers.

On a GPU every kernel is timed over its tiles on the first launch of a tuning key; here
``tuning.timed_by(tuning.favouring(i))`` runs that same path with a timer that makes tile ``i``
of every kernel win, so each tile's results are checked against the reference, and across tiles
against each other (bitwise: no tile changes a sum).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernel_lora_linear import _case, _check, _run

triton = pytest.importorskip("triton")
from igu_kernels import lora_linear, reference, tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TILES = max(len(t.configs_for(d)) for t in lora_linear.TUNED.values() for d in lora_linear.ACTIVATION_DTYPES)
DTYPE_NAMES = tuning.DTYPE_NAMES
# Against the reference: the dtypes the interpreter rounds as a GPU does (its fp32 -> bf16 cast
# truncates, so bf16 errors double there); bf16 still takes part in the bitwise comparison.
ROUNDED = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
EVERY_DTYPE = pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
# (rows, tokens, in, out, r): three dA / dB row chunks at every tile, odd features, 5 ranks.
SHAPE = (4, 75, 33, 17, 5)


def _forms():
    """Every flag the kernels are tuned under: the delta alone with IG (HAS_IG, no base), the base
    weight given (ACCUMULATE in dx, HAS_BASE in up), plain (no IG)."""
    return [dict(base="delta"), dict(base="weight"), dict(base="output", plan=False)]


def _chosen_indices(dtype: torch.dtype) -> dict[str, set[int]]:
    """Per kernel, the positions (in its dtype's tile list) of the tiles pinned so far."""
    name = DTYPE_NAMES[dtype]
    out = {}
    for kernel, tuned in lora_linear.TUNED.items():
        configs = [repr(c) for c in tuned.configs_for(name)]
        out[kernel] = {configs.index(repr(c)) for key, c in tuned.chosen().items() if key[0] == name}
    return out


@ROUNDED
@pytest.mark.parametrize("pick", [*range(TILES), -1], ids=[*(f"tile{i}" for i in range(TILES)), "last"])
def test_each_tile_wins_in_turn_and_matches_the_reference(dtype, pick):
    """The stale-partials regression: while _grad_h wrote dE's partials per BLOCK_M, a 64-row
    winner after a 32-row trial counted the trial's second half again (dE and the IG of E wrong)."""
    case = _case(SHAPE, "partial", dtype)
    with tuning.timed_by(tuning.favouring(pick)):
        for form in _forms():
            _check(case, dtype, **form)
        chosen = _chosen_indices(dtype)
    for kernel, tuned in lora_linear.TUNED.items():
        if tuned.dtype_arg in lora_linear.ACTIVATION_PTRS:  # not dE's, on fp32 rows whatever the dtype
            n = len(tuned.configs_for(DTYPE_NAMES[dtype]))
            assert chosen[kernel] == {range(n)[pick % n]}, (kernel, chosen[kernel])


@EVERY_DTYPE
def test_results_are_bitwise_the_same_whichever_tile_wins(dtype):
    case = _case(SHAPE, "partial", dtype)
    runs = []
    for pick in range(TILES):
        with tuning.timed_by(tuning.favouring(pick)):
            runs.append([t for form in _forms() for t in _run(lora_linear, case, torch.float32, **form)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_no_tile_changes_a_reduction():
    """What makes the bitwise equality hold: the block of each kernel's reduction dim is the same
    in every tile of a dtype, and a dA / dB chunk is a multiple of every row block."""
    for name, tuned in lora_linear.TUNED.items():
        block = lora_linear.REDUCTION_BLOCK[name]
        for dtype in lora_linear.ACTIVATION_DTYPES:
            configs = tuned.configs_for(dtype)
            if block is not None:
                assert len({c.kwargs[block] for c in configs}) <= 1, (name, dtype)
            if name in ("_grad_a_kernel", "_grad_b_kernel", "_grad_e_kernel"):
                assert all(lora_linear._CHUNK_MULTIPLE % c.kwargs["BLOCK_M"] == 0 for c in configs)


class _CountingTimer:
    """favouring(0), counting the trials it times."""

    def __init__(self) -> None:
        self.trials: list[tuning.Trial] = []
        self._pick = tuning.favouring(0)

    def __call__(self, run, trial: tuning.Trial) -> float:
        self.trials.append(trial)
        return self._pick(run, trial)


def _tunings(timer: _CountingTimer) -> set[tuple]:
    return {(t.kernel, t.key) for t in timer.trials}


def test_tuning_keys_bucket_the_rows_and_the_rank():
    """A new batch length in the same power-of-two bucket of M, and pruning from 32 to 16 padded
    ranks (the same R_PAD bucket), reuse the pinned tiles; 64 ranks or twice the rows retune."""
    timer = _CountingTimer()
    with tuning.timed_by(timer):

        def run(tokens, r, mask="none"):
            before = len(_tunings(timer))
            _run(lora_linear, _case((2, tokens, 33, 17, r), mask, torch.float32), torch.float32)
            return len(_tunings(timer)) - before

        timed = [t for t in lora_linear.TUNED.values() if len(t.configs_for("fp32")) > 1]
        assert run(40, 20) == len(timed)
        assert run(36, 20) == 0  # 72 rows: 80's bucket (128)
        assert run(40, 20, "partial") == 0  # 10 active ranks: R_PAD 16, same bucket as 32
        assert run(40, 40) > 0  # R_PAD 64
        assert run(80, 20) > 0  # 160 rows


def test_the_in_place_dx_is_tuned_on_a_scratch_tensor():
    """No trial writes into the caller's dx: it is accumulated into exactly once."""
    seen = []

    def timer(run, trial):
        if trial.kernel == "_dx_kernel":
            seen.append(trial)
        return tuning.favouring(-1)(run, trial)

    case = _case(SHAPE, "none", torch.float32)
    with tuning.timed_by(timer):
        kernel = _run(lora_linear, case, torch.float32, base="weight")
    exact = _run(reference, case, torch.float64, base="weight")
    assert len(seen) == len(lora_linear.TUNED["_dx_kernel"].configs_for("fp32"))
    torch.testing.assert_close(kernel[1], exact[1], rtol=1e-4, atol=1e-4)  # du, with the base's dx


def test_launches_are_guarded_by_the_tensors_device(monkeypatch):
    guard = tuning.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    devices = []
    real = lora_linear.device_guard
    monkeypatch.setattr(lora_linear, "device_guard", lambda d: devices.append(d) or real(d))
    _run(lora_linear, _case(SHAPE, "none", torch.float32), torch.float32)
    assert devices == [torch.device("cpu")] * 2  # forward, backward


@pytest.mark.parametrize(
    "matmul, expected",
    [
        ({"fp32_precision": "tf32"}, True),
        ({"fp32_precision": "ieee"}, False),
        ({"fp32_precision": "none", "global": "tf32"}, True),
        ({"fp32_precision": "none", "global": "none"}, False),
        ({"allow_tf32": True}, True),  # torch < 2.9: the legacy flag alone
        ({"allow_tf32": False}, False),
    ],
)
def test_tf32_is_read_through_torch_s_current_api(monkeypatch, matmul, expected):
    class Matmul:
        pass

    fake = Matmul()
    for name, value in matmul.items():
        if name != "global":
            setattr(fake, name, value)
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    monkeypatch.setattr(torch.backends, "fp32_precision", matmul.get("global", "none"), raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lora_linear.tf32_enabled() is expected
    assert lora_linear._precision(torch.float32) == ("tf32" if expected else "ieee")
    assert lora_linear._precision(torch.float16) == "ieee"


_WORKER = """
import json, sys, torch
sys.path.insert(0, "tests")
from test_kernel_lora_linear import _case, _run
from igu_kernels import lora_linear, tuning
pick = int(sys.argv[1])
with tuning.timed_by(tuning.favouring(pick), tuning_file=True):
    out = _run(lora_linear, _case((4, 75, 33, 17, 5), "partial", torch.float16), torch.float32, base="weight")
    choices = tuning.choices()
torch.save(out, sys.argv[2])
print(json.dumps(choices))
"""


def _worker(pick: int, path: Path, env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(pick), str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_with_different_timings_compute_bitwise_the_same(tmp_path):
    """DDP ranks whose timers disagree: bitwise equal results anyway (no tile changes a sum), and
    with a shared IGULORA_TUNING_FILE the second process launches the first one's tiles."""
    env = {**os.environ, "TRITON_INTERPRET": "1", tuning.TUNING_FILE_ENV: str(tmp_path / "tiles.json")}
    first = _worker(0, tmp_path / "first.pt", env)
    second = _worker(-1, tmp_path / "second.pt", env)
    assert second == first  # pinned from the file: the last tile never won
    recorded = json.loads((tmp_path / "tiles.json").read_text())
    assert recorded == first
    alone = _worker(-1, tmp_path / "alone.pt", {k: v for k, v in env.items() if k != tuning.TUNING_FILE_ENV})
    assert alone != first  # without the file the last tile wins ...
    outputs = [torch.load(tmp_path / f"{n}.pt") for n in ("first", "second", "alone")]
    for a, b, c in zip(*outputs, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)  # ... and computes bitwise the same


def _far_apart_rows(rows: int, width: int, offset: int, storage: torch.Tensor) -> torch.Tensor:
    """A (rows, width) view of ``storage`` at column ``offset`` whose rows lie 2^29 elements
    apart: row 4 starts 2^31 elements past row 0, and only the rows' pages are ever touched. Row
    0 sits 2^31 elements into the storage, so an offset that wraps to -2^31 still reads inside it
    (zeros, not a crash)."""
    return storage.as_strided((rows, width), (2**29, 1), 2**31 + offset)


def test_row_offsets_past_two_to_the_31_do_not_wrap():
    """u, the base output and the output gradient as views whose row offsets pass 2^31 (as 150k
    rows at 14336 features do) give bitwise what contiguous copies give; int32 offsets wrapped
    there. The output y and du are written at such offsets too (raw launches below)."""
    rows, K, N, r = 6, 33, 17, 5
    storage = torch.empty(2**31 + (rows - 1) * 2**29 + 256, dtype=torch.float16)  # virtual: 9.7 GB
    g = torch.Generator().manual_seed(0)
    views = [_far_apart_rows(rows, w, o, storage) for w, o in ((K, 0), (N, 64), (N, 128))]
    for v in views:
        v.copy_(torch.randn(v.shape, generator=g))
    u, base, gy = views
    A, E, B = (torch.randn(*s, generator=g) for s in ((r, K), (r,), (N, r)))
    mask = torch.arange(r) % 2 == 0
    plan = tuple(torch.rand(rows, generator=g) for _ in range(3))

    def run(u, base, gy):
        u = u.detach().requires_grad_()
        params = [p.clone().requires_grad_() for p in (A, E, B)]
        buffers = tuple(torch.zeros_like(p) for p in params)
        y = lora_linear.adapted_linear(u, base, *params, mask, 0.5, plan=plan, ig_buffers=buffers)
        y.backward(gy)
        return [y, u.grad, *(p.grad for p in params), *buffers]

    far = run(u, base, gy)
    near = run(u.contiguous(), base.contiguous(), gy.contiguous())
    for a, b in zip(far, near, strict=True):
        assert torch.equal(a, b)

    # The stores: y (up) and an accumulated dx (dx) at far rows, against contiguous ones.
    h = torch.randn(rows, 16, generator=g)
    c = torch.rand(rows, generator=g)
    y_far, dx_far = (_far_apart_rows(rows, w, o, storage) for w, o in ((N, 160), (K, 192)))
    dx_far.copy_(torch.randn(dx_far.shape, generator=g))
    y_near, dx_near = torch.empty(rows, N, dtype=torch.float16), dx_far.contiguous()
    operands = lora_linear._Operands(A, E, B, mask)
    for y, dx in ((y_far, dx_far), (y_near, dx_near)):
        lora_linear._UP[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            h, operands.E, c, operands.B, y, y, rows, N, 1, y.stride(0), y.stride(0), 0.5,
            HAS_BASE=False, R_PAD=16, PRECISION="emulate",
        )  # fmt: skip
        lora_linear._DX[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))](
            h, operands.E, operands.A, dx, rows, K, dx.stride(0), ACCUMULATE=True, R_PAD=16,
            PRECISION="emulate",
        )  # fmt: skip
    assert torch.equal(y_far, y_near) and torch.equal(dx_far, dx_near)


def test_a_fake_timer_leaves_the_tuning_file_alone_and_stale_records_are_ignored(tmp_path, monkeypatch):
    """Forced picks neither come from IGULORA_TUNING_FILE nor go into it; a record that is not one
    of the dtype's tiles (a file from an older tile list) is never launched."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    case = _case(SHAPE, "none", torch.float32)
    with tuning.timed_by(tuning.favouring(-1)):
        _run(lora_linear, case, torch.float32)
    assert not path.exists()
    with tuning.timed_by(tuning.favouring(0), tuning_file=True):
        _run(lora_linear, case, torch.float32)
        recorded = json.loads(path.read_text())
    down = recorded["_down_kernel"]
    key = next(iter(down))
    down[key] = {"kwargs": {"BLOCK_M": 256, "BLOCK_K": 64}, "num_warps": 4, "num_stages": 3}  # not a tile
    path.write_text(json.dumps(recorded))
    last = tuning.config_record(lora_linear.TUNED["_down_kernel"].configs_for("fp32")[-1])
    with tuning.timed_by(tuning.favouring(-1), tuning_file=True):
        _run(lora_linear, case, torch.float32)
        chosen = lora_linear.TUNED["_down_kernel"].chosen()
    assert [tuning.config_record(c) for c in chosen.values()] == [last]  # timed again
    assert json.loads(path.read_text())["_down_kernel"][key] == last  # and the record replaced
