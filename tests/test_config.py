"""IGULoraConfig validation: each bad value is a ValueError naming its field."""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields

import pytest

from igulora import IGULoraConfig
from igulora.config import FIELD_RULES

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


@pytest.mark.parametrize(
    "field, value",
    [  # issue #34: accepted, then failing later without the field's name
        ("modules_to_save", "classifier"),
        ("modules_to_save", 123),
        ("modules_to_save", ["classifier", 3]),
        ("exclude_modules", 123),
        ("exclude_modules", "("),
        ("target_modules", "("),
        ("target_modules", {"query": 1}),
        ("seed", "x"),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.0),
        ("target_r", 0),  # prunes every adapter: save_pretrained then fails
        ("target_r", True),
        ("target_r", math.nan),
        ("init_r", True),
        ("init_r", 2.0),
        ("lora_alpha", "32"),
        ("lora_alpha", math.inf),
        ("lora_alpha", 10**400),  # an int no float holds
        ("lora_dropout", None),
        ("beta1", True),
        ("score_eps", -1e-9),
        ("score_eps", None),
        ("ig_tolerance", 0),
        ("orth_reg_weight", math.nan),
        ("total_step", True),
        ("tinit", True),
        ("tfinal", "0.1"),
        ("delta_t", 1.0),
        ("ig_steps", True),
        ("ig_steps", "Auto"),
        ("ig_max_steps", 0),
        ("stochastic_grid", None),
        ("ig_every", False),
        ("ig_window", 0),
        ("ig_window", 2.0),
        ("compact", 0),
        ("compact", "yes"),
        ("ig_residual", 1),
        ("ig_residual", None),
        ("init", None),
        ("score", ["snr"]),
        ("base_model_name_or_path", 7),
    ],
)
def test_each_field_is_type_and_range_checked_by_name(field, value):
    message = rf"^IGULoraConfig\.{field}={re.escape(repr(value))}: must be "
    with pytest.raises(ValueError, match=message):
        IGULoraConfig(**{**BASE, field: value})


def test_every_field_has_a_rule_in_field_order():
    assert list(FIELD_RULES) == [f.name for f in fields(IGULoraConfig)]


def test_a_bare_string_for_modules_to_save_suggests_a_list():
    with pytest.raises(ValueError, match=r"a list of module names such as \['classifier'\]"):
        IGULoraConfig(modules_to_save="classifier")


def test_ints_where_floats_go_none_where_allowed_and_tuples_become_lists():
    config = IGULoraConfig(
        target_modules=("query", "value"),
        exclude_modules=("value",),
        modules_to_save=("classifier",),
        lora_alpha=16,
        lora_dropout=0,
        score_eps=0,
        ig_tolerance=1,
        ig_fraction=1,
        compact=False,
        total_step=None,
        base_model_name_or_path=None,
        seed=2**64 - 1,
    )
    assert (config.target_modules, config.exclude_modules, config.modules_to_save) == (
        ["query", "value"],
        ["value"],
        ["classifier"],
    )
    assert IGULoraConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(
    "field, value", [("seed", "x"), ("modules_to_save", "classifier"), ("target_r", 0), ("compact", 1)]
)
def test_an_edited_json_config_raises_the_same_named_errors(field, value):
    data = json.loads(IGULoraConfig(**BASE).to_json())
    data[field] = value
    with pytest.raises(ValueError, match=rf"^IGULoraConfig\.{field}="):
        IGULoraConfig.from_dict(data)
    with pytest.raises(ValueError, match="IGULoraConfig.from_dict: expected a mapping"):
        IGULoraConfig.from_dict([field])


@pytest.mark.parametrize(
    ("ig_every", "ig_window", "expected"),
    [
        # every multiple of delta_t = 10 past tinit = 10 and before the final phase (step 80)
        # reallocates after its own update; step 80 reallocates after step 79's
        (1, 2, [19, 20, 29, 30, 39, 40, 49, 50, 59, 60, 69, 70, 78, 79]),
        (2, 4, [18, 20, 28, 30, 38, 40, 48, 50, 58, 60, 68, 70, 76, 78]),
        (2, None, list(range(0, 80, 2))),  # the default: every second step until the final phase
    ],
)
def test_the_scoring_window_keeps_the_last_updates_before_each_reallocation(ig_every, ig_window, expected):
    config = IGULoraConfig(
        total_step=100, tinit=10, tfinal=20, delta_t=10, ig_every=ig_every, ig_window=ig_window
    )
    assert [step for step in range(100) if config.scores_at(step)] == expected
    assert not any(
        IGULoraConfig(total_step=100, tinit=10, tfinal=20, ig_rule="gradient").scores_at(s)
        for s in range(100)
    )
