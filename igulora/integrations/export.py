"""Adapters for inference servers: vLLM's loading rules, and a uniform-rank layout for servers
that read neither ``rank_pattern`` nor ``alpha_pattern``.

``IGUModel.peft_export`` (what ``save_pretrained`` writes) keeps each module's own rank:
``rank_pattern = alpha_pattern = {module: rank}`` under ``r = lora_alpha = max rank``, so every
module's LoRA scale is 1 (the IGU scale is folded into ``lora_B``). :func:`vllm_problems` checks
such a config against the rules vLLM applies when it loads a PEFT LoRA; :func:`uniform_export`
pads every module to the largest rank for servers that need one rank (SGLang 0.5, vLLM < 0.32).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch.nn import functional as F

from igulora.distributed import is_main_process
from igulora.io import write_json, write_safetensors
from igulora.model import IGUModel
from igulora.save_format import PEFT_CONFIG, PEFT_WEIGHTS

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (``MaxLoRARanks`` in ``vllm/config/lora.py``)."""
VLLM_MODULES_TO_SAVE = frozenset({"classifier", "score"})
"""The ``modules_to_save`` vLLM loads (a sequence-classification head); anything else is refused."""
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "a bias term in lora_B",
}


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _pattern_keys(patterns: Mapping[str, object], module: str) -> list[str]:
    """The keys of a PEFT ``rank_pattern``/``alpha_pattern`` that name ``module``: PEFT's rule is
    ``re.match(rf"(.*\\.)?({key})$", module)`` and it takes the first such key in file order."""
    return [key for key in patterns if re.match(rf"(.*\.)?({key})$", module)]


def _pattern_problems(name: str, patterns: Mapping[str, object], modules: list[str]) -> list[str]:
    problems = []
    for key in patterns:
        try:
            re.compile(key)
        except re.error as error:
            problems.append(f"{name} key {key!r} is not a valid regular expression ({error})")
    if problems:
        return problems
    for module in modules:
        keys = _pattern_keys(patterns, module)
        if len(keys) > 1:
            problems.append(
                f"module {module!r} matches {len(keys)} {name} keys {keys[:3]}: PEFT takes the first in "
                "file order, so its value depends on the key order"
            )
        elif module in patterns and keys != [module]:
            problems.append(f"{name} key {module!r} does not select its own module under PEFT's rule")
    return problems


def _largest_rank(adapter_config: dict) -> int | None:
    ranks = [adapter_config.get("r"), *(adapter_config.get("rank_pattern") or {}).values()]
    return max((r for r in ranks if _is_rank(r)), default=None)


def required_max_lora_rank(adapter_config: dict) -> int:
    """The ``--max-lora-rank`` to serve this adapter with: its largest rank rounded up to the next
    value vLLM accepts (:data:`VLLM_MAX_LORA_RANKS`)."""
    largest = _largest_rank(adapter_config)
    if largest is None:
        raise ValueError(f"the adapter config has no positive integer rank (r = {adapter_config.get('r')!r})")
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= largest:
            return allowed
    raise ValueError(
        f"rank {largest} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts"
    )


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def vllm_problems(adapter_config: dict, max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM (>= 0.32) would refuse this PEFT LoRA config, or serve other outputs than PEFT;
    empty when it is servable. ``max_lora_rank``: the server's ``--max-lora-rank``, if known.

    Checked: ``peft_type`` LORA; ``r``, ``lora_alpha`` and ``target_modules`` present; ``r`` and
    every ``rank_pattern`` value a positive int, every alpha positive; the largest rank within
    ``max_lora_rank`` (itself one vLLM accepts) and within 512; ``modules_to_save`` only
    ``classifier``/``score``; no DoRA, ``lora_bias`` or ``bias`` other than "none"; under PEFT's
    pattern rule every module of a ``target_modules`` list matched by at most one key of each
    pattern, and by its own key when it has one; and every module's LoRA scale equal to
    ``lora_alpha / r``, so that a server applying one scale to all modules agrees with PEFT.
    """
    config = adapter_config
    r, alpha = config.get("r"), config.get("lora_alpha")
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    targets = config.get("target_modules")
    modules = list(targets) if isinstance(targets, (list, tuple)) else []

    problems = [
        f"missing required field {key!r}"
        for key in ("r", "lora_alpha", "target_modules")
        if key not in config
    ]
    if "r" in config and not _is_rank(r):
        problems.append(f"r = {r!r} is not a positive int")
    if "lora_alpha" in config and not _is_alpha(alpha):
        problems.append(f"lora_alpha = {alpha!r} is not a positive number")
    problems += [
        f"rank_pattern[{k!r}] = {v!r} is not a positive int" for k, v in ranks.items() if not _is_rank(v)
    ]
    problems += [
        f"alpha_pattern[{k!r}] = {v!r} is not a positive number"
        for k, v in alphas.items()
        if not _is_alpha(v)
    ]
    problems += _pattern_problems("rank_pattern", ranks, modules)
    problems += _pattern_problems("alpha_pattern", alphas, modules)
    if not problems:  # every rank, alpha and key is valid: each module's scale is known
        problems += _scale_problems(config, modules)

    largest = _largest_rank(config)
    if largest is not None and largest > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(
            f"rank {largest} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts"
        )
    elif largest is not None and max_lora_rank is not None and largest > max_lora_rank:
        problems.append(
            f"rank {largest} is above max_lora_rank {max_lora_rank}: serve with --max-lora-rank "
            f"{required_max_lora_rank(config)}"
        )
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"max_lora_rank {max_lora_rank} is not one vLLM accepts {VLLM_MAX_LORA_RANKS}")

    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config['peft_type']!r} is not LORA")
    extra = sorted(set(config.get("modules_to_save") or ()) - VLLM_MODULES_TO_SAVE)
    if extra:
        problems.append(f"modules_to_save {extra}: vLLM loads only {sorted(VLLM_MODULES_TO_SAVE)}")
    problems += [
        f"{option} is set: vLLM does not serve {what}"
        for option, what in UNSUPPORTED_OPTIONS.items()
        if config.get(option)
    ]
    if config.get("bias", "none") != "none":
        problems.append(f"bias = {config['bias']!r}: vLLM serves LoRA adapters without bias terms")
    return problems


def _scale_problems(config: dict, modules: list[str]) -> list[str]:
    """Modules whose PEFT scale differs from the one ``lora_alpha / r`` (sqrt(r) under rsLoRA)."""
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    scale = _scale(config["lora_alpha"], config["r"], rslora)
    problems = []
    for module in modules:
        rank_keys, alpha_keys = _pattern_keys(ranks, module), _pattern_keys(alphas, module)
        rank = ranks[rank_keys[0]] if rank_keys else config["r"]
        alpha = alphas[alpha_keys[0]] if alpha_keys else config["lora_alpha"]
        if not math.isclose(_scale(alpha, rank, rslora), scale, rel_tol=1e-12):
            problems.append(
                f"module {module!r} has LoRA scale {_scale(alpha, rank, rslora):g} but lora_alpha / r "
                f"gives {scale:g}: a server applying one scale to every module serves other outputs"
            )
    return problems


def uniform_export(igu: IGUModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """``igu.peft_export()`` with every module zero-padded to the largest rank ``r`` (rows of
    ``lora_A``, columns of ``lora_B``) and no ``rank_pattern``/``alpha_pattern``: one rank and
    scale 1 (``lora_alpha = r``) for all modules, the same outputs. Modules pruned to rank 0 stay
    out, as in ``peft_export``: a server gives a module without weights no LoRA."""
    config, tensors = igu.peft_export()
    r = config["r"]
    tensors = dict(tensors)
    for name in config["rank_pattern"]:
        a, b = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        tensors[a] = F.pad(tensors[a], (0, 0, 0, r - tensors[a].shape[0]))
        tensors[b] = F.pad(tensors[b], (0, r - tensors[b].shape[1]))
    return {**config, "lora_alpha": r, "rank_pattern": {}, "alpha_pattern": {}}, tensors


def _write_peft(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    if not is_main_process():
        return
    directory = Path(directory)
    write_safetensors(directory / PEFT_WEIGHTS, tensors)
    write_json(directory / PEFT_CONFIG, config)


def save_uniform(igu: IGUModel, directory: str | Path) -> None:
    """Write :func:`uniform_export` as a PEFT pair (adapter_config.json, adapter_model.safetensors),
    each file atomically. Under FSDP2 call it on every rank (the main process writes)."""
    _write_peft(directory, *uniform_export(igu))


def save_for_serving(
    igu: IGUModel,
    directory: str | Path,
    layout: Literal["rank_pattern", "uniform"] = "rank_pattern",
    max_lora_rank: int | None = None,
) -> None:
    """Write the PEFT pair for a server: ``layout="rank_pattern"`` (``peft_export``, each module
    at its own rank: vLLM >= 0.32) or ``"uniform"`` (:func:`uniform_export`: SGLang 0.5, vLLM
    < 0.32). The config is checked with :func:`vllm_problems` first: on a problem a ValueError
    names it and nothing is written."""
    if layout == "rank_pattern":
        config, tensors = igu.peft_export()
    elif layout == "uniform":
        config, tensors = uniform_export(igu)
    else:
        raise ValueError(f"layout must be 'rank_pattern' or 'uniform', not {layout!r}")
    problems = vllm_problems(config, max_lora_rank)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ValueError(f"{directory}: not servable by vLLM, nothing written: {shown}")
    _write_peft(directory, config, tensors)


__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "required_max_lora_rank",
    "save_for_serving",
    "save_uniform",
    "uniform_export",
    "vllm_problems",
]
