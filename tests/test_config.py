"""IGULoraConfig validation: each bad value is a ValueError naming its field."""

from __future__ import annotations

import pytest

from igulora import IGULoraConfig

BASE = dict(total_step=100, tinit=10, tfinal=20)


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("target_r", dict(init_r=4, target_r=5)),
        ("init_r", dict(init_r=0)),
        ("total_step", dict(total_step=1.5)),
        ("tinit", dict(tinit=1.0)),
        ("tfinal", dict(tinit=0.6, tfinal=0.5)),
        ("total_step", dict(total_step=0)),
        ("tfinal", dict(tinit=50, tfinal=50)),
        ("tinit", dict(tinit=-1)),
        ("beta1", dict(beta1=1.0)),
        ("beta2", dict(beta2=0.0)),
        ("ig_rule", dict(ig_rule="simpson")),
        ("score", dict(score="magnitude")),
        ("ig_steps", dict(ig_steps=0)),
        ("ig_every", dict(ig_every=0)),
        ("ig_fraction", dict(ig_fraction=0.0)),
        ("ig_fraction", dict(ig_fraction=1.5)),
        ("lora_dropout", dict(lora_dropout=1.0)),
        ("delta_t", dict(delta_t=0)),
        ("budget_unit", dict(budget_unit="bytes")),
        ("prune_mode", dict(prune_mode="drop")),
        ("init", dict(init="gaussian")),
        ("target_modules", dict(target_modules=[])),
        ("orth_reg_weight", dict(orth_reg_weight=-1.0)),
        ("orth_reg_start", dict(orth_reg_start=-1)),
        ("orth_reg_start", dict(orth_reg_start="late")),
        ("orth_reg_start", dict(orth_reg_start=True)),
        ("orth_reg_start", dict(orth_reg_weight=0.1, orth_reg_start=100)),
    ],
)
def test_invalid_values_name_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"IGULoraConfig\.{field}="):
        IGULoraConfig(**{**BASE, **overrides})


def test_round_trip_and_unknown_fields():
    config = IGULoraConfig(target_modules=["q_proj"], **BASE)
    assert IGULoraConfig.from_dict(config.to_dict()) == config
    assert config.scaling == config.lora_alpha / config.init_r
    with pytest.raises(ValueError, match="unknown fields.*'rank'"):
        IGULoraConfig.from_dict({**config.to_dict(), "rank": 3})


def test_total_step_left_to_the_trainer_and_fractional_phases():
    config = IGULoraConfig(total_step=None, tinit=0.1, tfinal=0.25)
    assert config.total_step is None and config.tinit == 0.1  # kept until the run length is known
    run = config.resolved(40)
    assert (run.total_step, run.tinit, run.tfinal) == (40, 4, 10)
    assert IGULoraConfig(total_step=40, tinit=0.1, tfinal=0.25) == run
    with pytest.raises(ValueError, match="total_step=40 is set already"):
        run.resolved(50)
    with pytest.raises(ValueError, match=r"IGULoraConfig\.tfinal="):
        IGULoraConfig(total_step=None, tinit=0.5, tfinal=0.5).resolved(10)
