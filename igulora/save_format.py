"""igulora's save format on disk: file names, version, and reading it back with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from igulora.layer import is_adaptable, linear_features

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
IGU_CONFIG = "igulora_config.json"
IGU_STATE = "igulora_state.safetensors"
FORMAT_VERSION = 1


def read_meta(directory: str | Path) -> tuple[dict, Path]:
    path = Path(directory) / IGU_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an igulora save directory")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta, path


def read_state(path: Path, modules: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Load igulora's state file, with an error naming the file if it is missing or corrupt."""
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated or bad headers
        raise ValueError(f"{path}: cannot read the adapter state ({type(error).__name__}: {error})") from None
    for name, (in_features, out_features, r) in modules.items():
        expected = {"lora_A": (r, in_features), "lora_E": (r,), "lora_B": (out_features, r)}
        for param, shape in expected.items():
            value = state.get(f"adapter.{name}.{param}")
            if value is None or tuple(value.shape) != shape:
                found = None if value is None else tuple(value.shape)
                raise ValueError(f"{path}: {name}.{param} should have shape {shape}, found {found}")
    return state


def check_modules(model: nn.Module, modules: dict[str, list[int]], path: Path) -> None:
    """Every saved adapter must find an adaptable module of the same shape in ``model``."""
    present = dict(model.named_modules())
    for name, (in_features, out_features, _) in modules.items():
        module = present.get(name)
        if module is None or not is_adaptable(module):
            raise ValueError(f"{path}: module {name!r} is not a Linear/Conv1D of {type(model).__name__}")
        features = linear_features(module)
        if features != (in_features, out_features):
            raise ValueError(
                f"{path}: module {name!r} is {features[0]} -> {features[1]} in this model but "
                f"{in_features} -> {out_features} in the save (another base model?)"
            )
