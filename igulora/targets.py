"""Which modules get adapters: PEFT's ``target_modules`` rules, "all-linear", ``modules_to_save``."""

from __future__ import annotations

import re

from torch import nn

from igulora.config import IGULoraConfig
from igulora.layer import is_adaptable

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def name_matches(name: str, spec: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the full name; a list holds exact names
    or ``.name`` suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """The modules "all-linear" leaves out: the output embedding and task heads."""
    heads = {n for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def find_targets(model: nn.Module, config: IGULoraConfig) -> list[str]:
    """Names of the Linear / Conv1D modules ``config`` selects; raises when there are none."""
    candidates = [n for n, m in model.named_modules() if is_adaptable(m) and n]
    if config.target_modules == "all-linear":
        heads = output_head_names(model)
        targets = [n for n in candidates if n not in heads]
    else:
        targets = [n for n in candidates if name_matches(n, config.target_modules)]
    if config.exclude_modules is not None:
        targets = [n for n in targets if not name_matches(n, config.exclude_modules)]
    if not targets:
        suffixes = sorted({n.split(".")[-1] for n in candidates})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matched no Linear/Conv1D module of {type(model).__name__}. Candidate names: "
            f"{suffixes}; full names look like {candidates[:5]}"
        )
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def modules_to_save(model: nn.Module, config: IGULoraConfig) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for spec in config.modules_to_save or []:
        matched = {n: m for n, m in model.named_modules() if n and name_matches(n, [spec])}
        if not matched:
            raise ValueError(f"modules_to_save entry {spec!r} matches no module of {type(model).__name__}")
        found.update(matched)
    return found


def refuse_adapted(model: nn.Module) -> None:
    """Adapters on an adapted model would nest (on ``base_layer``, on PEFT's ``lora_A``): refuse,
    naming the first adapter found."""
    from igulora.layer import IGULoraLinear

    for name, module in model.named_modules():
        where = f"module {name!r}" if name else "the model itself"
        if isinstance(module, IGULoraLinear):
            raise ValueError(
                f"get_igu_model: {type(model).__name__} already has IGU-LoRA adapters ({where}); "
                "keep training that IGUModel, or start from the base model"
            )
        if type(module).__module__.split(".")[0] == "peft":
            raise ValueError(
                f"get_igu_model: {type(model).__name__} carries PEFT adapters ({where} is a "
                f"{type(module).__name__}); merge_and_unload() them first, or start from the base model"
            )


def refuse_overlap(targets: list[str], saved: list[str]) -> None:
    """A module both adapted and trained whole would train its base weight and save it in a form
    PEFT cannot load."""
    for target in targets:
        for whole in saved:
            if target == whole or target.startswith(whole + "."):
                raise ValueError(
                    f"IGULoraConfig: module {target!r} is selected by target_modules and, through "
                    f"modules_to_save entry {whole!r}, trained whole; leave it out of one (exclude_modules)"
                )
