"""``IGUModel.config``: the wrapped model's config, as Trainer, TRL, Accelerate and generation read
it, that still answers the IGU-LoRA field names it used to hold, with a deprecation warning."""

from __future__ import annotations

import copy
import warnings
from dataclasses import fields
from typing import Any

from igulora.config import IGULoraConfig

IGU_FIELDS = frozenset(f.name for f in fields(IGULoraConfig)) | {
    name for name, value in vars(IGULoraConfig).items() if isinstance(value, property)
}


def _deprecated(name: str) -> None:
    warnings.warn(
        f"IGUModel.config.{name}: IGUModel.config is the base model's config now (as PEFT's "
        f"PeftModel.config); the IGU-LoRA config is IGUModel.igu_config (igu.igu_config.{name})",
        DeprecationWarning,
        stacklevel=3,
    )


class BaseConfigView:
    """The base model's config (``isinstance`` sees its class; reads and writes reach it), falling
    back to the IGU-LoRA config, with a ``DeprecationWarning``, for names only that one has."""

    __slots__ = ("_base", "_igu")

    def __init__(self, base: Any, igu: IGULoraConfig) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_igu", igu)

    @property
    def __class__(self):  # noqa: D105 - isinstance(view, PretrainedConfig) holds, as for the base
        return type(self._base)

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._base, name)
        except AttributeError:
            if name not in IGU_FIELDS:
                raise
        _deprecated(name)
        return getattr(self._igu, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in IGU_FIELDS and not hasattr(self._base, name):
            _deprecated(name)
            setattr(self._igu, name, value)
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return repr(self._base)

    def __eq__(self, other: object) -> bool:
        return self._base == (other._base if type(other) is BaseConfigView else other)

    __hash__ = None

    def __iter__(self):
        return iter(self._base)

    def __copy__(self):
        return copy.copy(self._base)

    def __deepcopy__(self, memo: dict):
        return copy.deepcopy(self._base, memo)

    def __reduce_ex__(self, protocol: int):
        return self._base.__reduce_ex__(protocol)
