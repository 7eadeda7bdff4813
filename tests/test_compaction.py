"""Physical rank compaction: a compacted run is the masked run, step for step (fp64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lm_batch, randomize_adapters, tiny_bert, tiny_llama, token_batch

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model, sequence_classification_row_loss
from igulora.model import IGUModel

STEPS = 10
CASES = {
    "bert": (tiny_bert, sequence_classification_row_loss, lambda seed: token_batch(6, 7, seed=seed)),
    "llama": (tiny_llama, causal_lm_row_loss, lambda seed: lm_batch(4, 8, seed=seed)),
}
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.02, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
    "adamax": lambda params: torch.optim.Adamax(params, lr=0.02),  # state igulora does not know
}


def _config(**overrides) -> IGULoraConfig:
    base = dict(init_r=4, target_r=1, total_step=STEPS, tinit=2, tfinal=2, ig_every=1, ig_steps=2)
    base["orth_reg_weight"] = 0.0  # the plain runs; LIVE_TERM below adds the term over kept ranks
    return IGULoraConfig(**{**base, "ig_fraction": 0.5, **overrides})


def _model(case: str, **overrides) -> IGUModel:
    igu = get_igu_model(CASES[case][0](torch.float64), _config(**overrides))
    randomize_adapters(igu)
    return igu.train()


def _optimizer(igu: IGUModel, name: str):
    return OPTIMIZERS[name]([p for p in igu.parameters() if p.requires_grad])


def _train(case, optimizer="adamw", accumulation=1, resume_at=None, tmp_path=None, **overrides):
    """A manual loop of STEPS optimizer steps; returns the per-step rank patterns, the PEFT
    export, the model and the optimizer. ``resume_at``: save after that step and carry on in a
    fresh model and optimizer loaded from the save (as a restarted job would)."""
    _, row_loss_fn, make_batch = CASES[case]
    igu = _model(case, **overrides)
    opt = _optimizer(igu, optimizer)
    patterns = []
    for step in range(STEPS):
        for micro in range(accumulation):
            loss = igu.training_loss(make_batch(100 * step + micro), row_loss_fn)
            (loss / accumulation).backward()
        opt.step()
        igu.update_and_allocate(step, optimizer=opt)
        opt.zero_grad()
        patterns.append(igu.rank_pattern)
        if step == resume_at:
            igu.save_pretrained(tmp_path)
            torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
            igu = _model(case, **overrides)
            igu.load_state(tmp_path)
            opt = _optimizer(igu, optimizer)
            opt.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    return patterns, igu.peft_export()[1], igu, opt


def _assert_same_run(compacted, masked, exact=False):
    assert compacted[0] == masked[0]  # the rank pattern after every step
    assert compacted[1].keys() == masked[1].keys()
    for key, value in masked[1].items():
        if exact:
            assert torch.equal(compacted[1][key], value), key
        else:
            torch.testing.assert_close(compacted[1][key], value, rtol=1e-12, atol=1e-12, msg=key)


def _physical_ranks(igu):
    return {name: layer.r for name, layer in igu.adapters.items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_compacted_run_is_the_masked_run(case, optimizer):
    masked = _train(case, optimizer, compact=False)
    compacted = _train(case, optimizer)
    _assert_same_run(compacted, masked)
    igu, opt = compacted[2], compacted[3]
    assert _physical_ranks(igu) == igu.active_ranks and _physical_ranks(igu) != {n: 4 for n in igu.adapters}
    assert _physical_ranks(masked[2]) == {n: 4 for n in igu.adapters}
    for layer in igu.adapters.values():  # the optimizer state shrank with the parameters
        for param in (layer.lora_A, layer.lora_E, layer.lora_B):
            state = [v for v in opt.state[param].values() if torch.is_tensor(v) and v.dim()]
            assert state and all(v.shape == param.shape for v in state)


@pytest.mark.parametrize(
    "settings", [{"accumulation": 2}, {"ig_every": 3}], ids=["accumulation", "ig_every3"]
)
def test_compaction_is_exact_with_accumulation_and_sparse_scoring(settings):
    accumulation = settings.get("accumulation", 1)
    overrides = {k: v for k, v in settings.items() if k != "accumulation"}
    masked = _train("bert", accumulation=accumulation, compact=False, **overrides)
    _assert_same_run(_train("bert", accumulation=accumulation, **overrides), masked)


def test_resume_in_the_middle_of_a_compacted_run_is_bitwise(tmp_path):
    straight = _train("llama")
    resumed = _train("llama", resume_at=5, tmp_path=tmp_path)
    assert resumed[2].step == straight[2].step == STEPS
    _assert_same_run(resumed, straight, exact=True)
    assert _physical_ranks(resumed[2]) == _physical_ranks(straight[2])


def test_a_save_of_a_compacted_run_loads_like_a_masked_one(tmp_path):
    """The save holds the init_r layout: PEFT export, masks and from_pretrained as before."""
    _, _, igu, _ = _train("bert")
    igu.save_pretrained(tmp_path)
    loaded = IGUModel.from_pretrained(tiny_bert(torch.float64), tmp_path)
    assert loaded.rank_pattern == igu.rank_pattern
    assert _physical_ranks(loaded) == _physical_ranks(igu)  # compacted as the saved run was
    for key, value in igu.peft_export()[1].items():
        assert torch.equal(loaded.peft_export()[1][key], value)


@pytest.mark.parametrize(
    "overrides, warns",
    [
        ({"prune_mode": "zero"}, False),
        ({"prune_mode": "zero", "compact": True}, True),
        ({"orth_reg_weight": 0.1, "orth_reg_ranks": "all"}, False),  # AdaLoRA's term reaches pruned ranks
        ({"orth_reg_weight": 0.1, "orth_reg_ranks": "all", "compact": True}, True),
        ({"optimizer": "adamax"}, True),
    ],
)
def test_where_compaction_is_not_exact_ranks_stay_masked(overrides, warns):
    """Settings where compaction cannot be exact keep masking: never a silent change, a warning
    when compaction was asked for or the optimizer is unknown."""
    optimizer = overrides.pop("optimizer", "adamw")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train("bert", optimizer, **overrides)
    ours = [w for w in caught if "not compacted" in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in caught]
    assert _physical_ranks(result[2]) == {n: 4 for n in result[2].adapters}
    if optimizer == "adamax":
        _assert_same_run(result, _train("bert", optimizer, compact=False))


def test_no_optimizer_given_means_masking():
    igu = _model("bert")
    opt = _optimizer(igu, "adamw")
    for step in range(STEPS):
        igu.training_loss(token_batch(6, 7, seed=step)).backward()
        opt.step()
        igu.update_and_allocate(step)
        opt.zero_grad()
    assert _physical_ranks(igu) == {n: 4 for n in igu.adapters} and igu.active_ranks != _physical_ranks(igu)


def test_pruned_triplets_never_return_in_mask_mode():
    patterns = _train("bert", compact=False)[0]
    for before, after in zip(patterns, patterns[1:]):
        for name in before:
            assert all(b or not a for b, a in zip(before[name], after[name])), name


def test_an_adapter_compacted_to_zero_ranks_costs_nothing_and_exports_nothing():
    igu = _model("bert")
    name, layer = next(iter(igu.adapters.items()))
    layer.rank_mask.zero_()
    igu.compact(_optimizer(igu, "adamw"))
    assert layer.r == 0 and layer.lora_A.shape == (0, layer.in_features) and layer.lora_B.shape[1] == 0
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert not any(key.startswith(f"base_model.model.{name}.") for key in igu.peft_export()[1])
    loss = igu.training_loss(token_batch(6, 7, seed=1))
    loss.backward()  # a scoring step with an empty adapter
    assert layer.lora_A.grad is None or layer.lora_A.grad.numel() == 0


LIVE_TERM = dict(orth_reg_weight=0.25, orth_reg_ranks="live")  # the term over kept ranks only


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_with_the_live_rank_orthogonality_term_the_compacted_run_is_the_masked_run(case, optimizer):
    masked = _train(case, optimizer, compact=False, **LIVE_TERM)
    compacted = _train(case, optimizer, **LIVE_TERM)
    _assert_same_run(compacted, masked)
    assert _physical_ranks(compacted[2]) == compacted[2].active_ranks != {n: 4 for n in compacted[2].adapters}
    with_all_ranks = _train(case, optimizer, compact=False, orth_reg_weight=0.25, orth_reg_ranks="all")
    assert with_all_ranks[1].keys() == masked[1].keys()
    assert any(not torch.allclose(with_all_ranks[1][k], v) for k, v in masked[1].items())  # the term differs


@pytest.mark.parametrize("settings", [{"accumulation": 2}, {"resume_at": 5}], ids=["accumulation", "resume"])
def test_the_live_rank_term_stays_exact_with_accumulation_and_resume(settings, tmp_path):
    masked = _train("llama", compact=False, accumulation=settings.get("accumulation", 1), **LIVE_TERM)
    compacted = _train("llama", tmp_path=tmp_path, **settings, **LIVE_TERM)
    _assert_same_run(compacted, masked)


def test_the_live_rank_term_is_the_term_of_the_kept_submatrices():
    igu = _model("bert", **LIVE_TERM)
    layers = list(igu.adapters.values())
    layers[0].rank_mask.copy_(torch.tensor([True, False, True, False]))
    layers[1].rank_mask.zero_()  # every rank pruned: no term, and a zero (not NaN) gradient
    expected = 0.0
    for layer in layers:
        keep = layer.rank_mask.nonzero().flatten()
        A, B = layer.lora_A[keep], layer.lora_B[:, keep]
        eye = torch.eye(len(keep), dtype=A.dtype)
        expected = (
            expected + torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)
        )
    loss = igu.orthogonality_loss()
    torch.testing.assert_close(loss, expected / len(layers), rtol=1e-12, atol=1e-12)
    loss.backward()
    assert torch.isfinite(layers[1].lora_A.grad).all() and layers[1].lora_A.grad.abs().sum() == 0
    assert layers[0].lora_A.grad[[1, 3]].abs().sum() == 0 and layers[0].lora_A.grad[[0, 2]].abs().sum() > 0
