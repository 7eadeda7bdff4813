"""Launch configurations of the Triton kernels: tuned once per key, pinned, recorded.

A kernel module declares, for each kernel, the ``triton.Config`` list per activation dtype the
tuner may pick from (a config that fits bf16 can spill in fp32 IEEE), the arguments that key the
choice, and the one configuration the interpreter runs by default. The compile audit reads the
same declarations (``Tuned.configs_for``), so every configuration a GPU can pick is compiled and
inspected on the CPU.

On the first launch of a key, every configuration allowed for the dtype is timed by the current
timer (``triton.testing.do_bench`` on a GPU) and the fastest is pinned for the process: the key
is the dtype, the declared arguments, a power-of-two bucket of the rows ``M`` (a tile picked on a
short warm-up batch does not serve a 128k-token one) and a bucket of ``R_PAD`` (pruning 64 -> 32
-> 16 ranks does not retune at each step). Pointers a kernel updates in place (``scratch``) are
tuned on a scratch tensor, so no trial touches the caller's data; every other output is written
whole by every configuration, and the kernels' reductions do not depend on the tile (tested), so
no trial can leave a partial result behind.

``IGULORA_TUNING_FILE=path.json``: choices found there are used without timing, new ones are
added to it (atomically), so processes sharing it (DDP ranks, a second run) launch the same tiles.

The interpreter runs the fixed configuration, unless a timer is installed with :func:`timed_by`:
then the tuned path runs there too, which is how the tests force each configuration to win.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from igu_kernels.dispatch import interpreting

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TUNING_FILE_ENV = "IGULORA_TUNING_FILE"


@dataclass(frozen=True)
class Trial:
    """One configuration being timed: ``configs[index]`` of ``kernel`` for tuning key ``key``."""

    kernel: str
    key: tuple
    index: int
    configs: tuple[triton.Config, ...]

    @property
    def config(self) -> triton.Config:
        return self.configs[self.index]


Timer = Callable[[Callable[[], None], Trial], float]  # (run one launch, trial) -> time


def device_timer(run: Callable[[], None], trial: Trial) -> float:
    """Median milliseconds of ``run`` on the GPU."""
    return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")


def favouring(pick: int) -> Timer:
    """A deterministic fake timer: configuration ``pick`` (Python indexing: -1 is the last) of
    every kernel wins. Each trial really launches once, as on a GPU."""

    def timer(run: Callable[[], None], trial: Trial) -> float:
        run()
        return 0.0 if trial.index == pick % len(trial.configs) else 1.0

    return timer


_timer: Timer | None = None  # None: device_timer on a GPU, the fixed configuration in the interpreter
_tuning_file = True  # whether IGULORA_TUNING_FILE is read and written
REGISTRY: list[Tuned] = []


@contextlib.contextmanager
def timed_by(timer: Timer, tuning_file: bool = False) -> Iterator[None]:
    """Tune with ``timer`` (also in the interpreter), from empty caches; the previous timer and
    choices come back on exit. IGULORA_TUNING_FILE is left alone unless ``tuning_file``: a fake
    timer's picks must neither come from it nor go into it."""
    global _timer, _tuning_file
    saved = [(tuned, dict(tuned.cache)) for tuned in REGISTRY]
    previous = _timer, _tuning_file
    _timer, _tuning_file = timer, tuning_file
    for tuned in REGISTRY:
        tuned.cache.clear()
    try:
        yield
    finally:
        _timer, _tuning_file = previous
        for tuned, cache in saved:
            tuned.cache.clear()
            tuned.cache.update(cache)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' ``device``, not the current one (tensors on cuda:1 while cuda:0 is
    current); nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _bucket_m(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


def _bucket_rank(r_pad: int) -> str:
    return "wide" if r_pad >= 64 else "narrow"


BUCKETS = {"M": _bucket_m, "R_PAD": _bucket_rank}


def config_record(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


@dataclass
class Tuned:
    """One kernel with its launch space. ``tuned[grid](*args, **constexprs)`` launches it;
    ``grid`` is a function of the chosen configuration's constexprs (``meta``)."""

    kernel: triton.runtime.JITFunction
    configs: dict[str, Sequence[triton.Config]]  # by activation dtype name
    key: Sequence[str]  # arguments that key the choice (besides the dtype and BUCKETS)
    dtype_arg: str  # the pointer whose element type names the dtype
    interpreter: dict
    scratch: Sequence[str] = ()  # pointers the kernel updates in place: tuned on a scratch copy
    cache: dict[tuple, triton.Config] = field(default_factory=dict)  # pinned choices

    def __post_init__(self) -> None:
        REGISTRY.append(self)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def configs_for(self, dtype: str) -> list[triton.Config]:
        """The tiles for activations of ``dtype`` (none for a kernel that takes no activations
        of that dtype)."""
        return list(self.configs.get(dtype, ()))

    def chosen(self) -> dict[tuple, triton.Config]:
        """The configuration pinned per tuning key in this process."""
        return dict(self.cache)

    def tuning_key(self, named: dict) -> tuple:
        dtype = DTYPE_NAMES[named[self.dtype_arg].dtype]
        bucketed = tuple(f"{n}~{fn(named[n])}" for n, fn in BUCKETS.items())
        return (dtype, *(f"{n}={named[n]}" for n in self.key), *bucketed)

    def __getitem__(self, grid: Callable[[dict], tuple[int, ...]]) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **constexprs) -> None:
        if interpreting() and _timer is None:
            meta = self.interpreter
            self.kernel[grid(meta)](*args, **constexprs, **meta)
            return
        named = dict(zip(self.kernel.arg_names, args)) | constexprs
        key = self.tuning_key(named)
        config = self.cache.get(key) or self._pinned(key) or self._tune(grid, args, constexprs, named, key)
        self._run(config, grid, args, constexprs)

    def _run(self, config: triton.Config, grid, args, constexprs) -> None:
        self.kernel[grid(config.kwargs)](
            *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )

    def _pinned(self, key: tuple) -> triton.Config | None:
        """The choice for ``key`` in IGULORA_TUNING_FILE, if it is one of this dtype's configs
        (a file from an older tile list is ignored: an unaudited tile never launches)."""
        return self._allowed(key, read_tuning_file().get(self.name, {}).get(repr(key)))

    def _allowed(self, key: tuple, record: dict | None) -> triton.Config | None:
        config = next((c for c in self.configs[key[0]] if config_record(c) == record), None)
        if config is not None:
            self.cache[key] = config
        return config

    def _tune(self, grid, args, constexprs, named, key) -> triton.Config:
        configs = tuple(self.configs[key[0]])
        if len(configs) > 1:
            trial_args = list(args)
            for name in self.scratch:
                i = self.kernel.arg_names.index(name)
                trial_args[i] = torch.zeros_like(named[name])
            timer = _timer or device_timer
            times = []
            for index, config in enumerate(configs):
                trial = Trial(self.name, key, index, configs)
                try:
                    times.append(
                        timer(functools.partial(self._run, config, grid, trial_args, constexprs), trial)
                    )
                except triton.runtime.errors.OutOfResources:
                    times.append(float("inf"))
            configs = (configs[min(range(len(times)), key=times.__getitem__)],)  # first of equals
        self.cache[key] = configs[0]
        # Another process may have recorded this key while we timed it: launch its tile.
        allowed = [config_record(c) for c in self.configs[key[0]]]
        return self._allowed(key, record_choice(self.name, key, configs[0], allowed)) or configs[0]


def _tuning_path() -> Path | None:
    path = os.environ.get(TUNING_FILE_ENV)
    return Path(path) if path and _tuning_file else None


def read_tuning_file() -> dict:
    path = _tuning_path()
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text() or "{}")


def record_choice(kernel: str, key: tuple, config: triton.Config, allowed: list[dict]) -> dict | None:
    """Add one choice to IGULORA_TUNING_FILE (under a lock, written atomically) unless another
    process recorded one of the ``allowed`` tiles for this key first; returns the record the file
    holds (None without a file)."""
    target = _tuning_path()
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = read_tuning_file()
        record = records.setdefault(kernel, {}).get(repr(key))
        if record not in allowed:
            record = records[kernel][repr(key)] = config_record(config)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users' processes out
        os.replace(tmp, target)
    return record


def choices() -> dict[str, dict[str, dict]]:
    """Every choice pinned in this process: {kernel: {repr(key): config}}."""
    return {t.name: {repr(k): config_record(c) for k, c in t.cache.items()} for t in REGISTRY if t.cache}
