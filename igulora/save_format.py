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


def check_ranks(modules: dict[str, list[int]], init_r: int, path: Path) -> None:
    """Every saved adapter holds ``init_r`` ranks (the layout the config builds)."""
    other = {name: r for name, (_, _, r) in modules.items() if r != init_r}
    if other:
        name, r = next(iter(other.items()))
        raise ValueError(
            f"{path}: the config's init_r={init_r} but adapter {name!r} was saved with {r} ranks "
            f"({len(other)} adapters differ; an edited igulora_config.json?)"
        )


def check_saved_modules(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], path: Path) -> None:
    """Every trained whole module (``modules_to_save``) finds its tensors, of its shapes, in the save."""
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            saved = state.get(f"saved.{name}.{key}")
            if saved is None or saved.shape != value.shape:
                found = None if saved is None else tuple(saved.shape)
                raise ValueError(
                    f"{path.parent / IGU_STATE}: modules_to_save {name}.{key} is {tuple(value.shape)} in "
                    f"this model but {found} in the save (another head size, num_labels?)"
                )
