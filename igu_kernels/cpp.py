"""The C++ CPU ops (``csrc/``): compiled once on first use, cached, exposed as torch.ops.igulora.*.

``load()`` returns True when the ops are registered. Without a compiler or ninja, or when the
build fails or another process's build does not finish in time, it warns once, says why, and
igulora runs on the eager reference.

The build directory is keyed by everything that changes the build (the source's path, torch's
install path and version, Python's headers, the compiler, the flags, the CPU), so two environments never share
one and never rebuild each other's. Processes of one environment take an exclusive ``flock`` on
the directory before building or loading: the kernel drops it when its holder dies, so a killed
build never blocks (its leftover ``torch.utils.cpp_extension`` lock is removed, with a warning),
and a live build elsewhere is waited for at most ``IGULORA_CPP_WAIT_S`` seconds (default 600).
A finished build is loaded directly (no ninja run, no subprocess), so processes that start
together, such as the ranks of a distributed job, only wait for each other's dlopen.

Prebuild: ``python -m igu_kernels.cpp --build``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from igu_kernels.reference import SCORES


def _source() -> Path:
    """The copy inside the package (a wheel install: setup.py puts it there), else csrc/ of the
    checkout (an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "csrc" / "igulora_ops.cpp"
    return packaged if packaged.is_file() else here.parent / "csrc" / "igulora_ops.cpp"


SOURCE = _source()
NAME = "igulora_cpu_ops"
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # no FMA: eager-exact
LDFLAGS = ["-fopenmp"]
_why_not: str | None = None


def _cpu_flags() -> str:
    """The CPU's feature flags: the build uses -march=native, so a cached build must never be
    loaded on a different CPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _compiler() -> str:
    """The C++ compiler torch's build will call, and its version line."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{cxx} {version.splitlines()[0] if version else '(not found)'}"


def build_key() -> str:
    """A hash of everything that changes the build."""
    parts = [
        str(SOURCE),  # a checkout and an installed copy must not rebuild each other's
        torch.__version__,
        str(Path(torch.__file__).resolve().parent),
        sysconfig.get_paths()["include"],
        sys.version,
        _compiler(),
        " ".join(CFLAGS + LDFLAGS),
        _cpu_flags(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_dir() -> Path:
    root = os.environ.get("IGULORA_CPP_CACHE") or Path.home() / ".cache" / "igulora"
    path = Path(root) / f"torch-{torch.__version__}-{build_key()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait_bound() -> float:
    return float(os.environ.get("IGULORA_CPP_WAIT_S", "600"))


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``directory`` (the kernel releases it if this process dies).

    Waits at most ``IGULORA_CPP_WAIT_S`` seconds for another process, saying so in one line.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no cross-process exclusion
        yield
        return
    path = directory / "igulora.lock"
    with open(path, "a+") as f:
        deadline, announced = time.monotonic() + _wait_bound(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has held {path} for over {_wait_bound():.0f} s (IGULORA_CPP_WAIT_S)"
                    ) from None
                if not announced:
                    f.seek(0)
                    owner = f.read().strip() or "another process"
                    print(
                        f"igulora: waiting for {owner}, which is building or loading the C++ ops"
                        f" in {directory}",
                        file=sys.stderr,
                    )
                    announced = True
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _built(directory: Path) -> bool:
    library = directory / f"{NAME}.so"
    return library.is_file() and library.stat().st_mtime >= SOURCE.stat().st_mtime


@functools.cache
def load() -> bool:
    """Compile (first time only) and load the ops; False with one warning if that is impossible."""
    global _why_not
    if hasattr(torch.ops, "igulora") and hasattr(torch.ops.igulora, "score_update_"):
        return True
    try:
        if not SOURCE.is_file():
            raise FileNotFoundError(f"{SOURCE} is missing")
        directory = build_dir()
        with _exclusive(directory):
            leftover = directory / "lock"  # cpp_extension's own lock: under ours, only a dead build's
            killed = leftover.exists()
            if killed:
                warnings.warn(
                    f"igulora: removing {leftover}, left by a C++ build that was killed; rebuilding",
                    stacklevel=3,
                )
                leftover.unlink()
            if _built(directory) and not killed:  # a plain dlopen: no ninja, no subprocess
                torch.ops.load_library(str(directory / f"{NAME}.so"))
            else:
                _build_and_load(directory)
    except Exception as error:  # no compiler, no ninja, a failed build, a timeout: fall back, loudly once
        last_line = (str(error).strip().splitlines() or [""])[-1][:300]
        _why_not = f"{type(error).__name__}: {last_line}"
        warnings.warn(f"igulora: C++ CPU ops unavailable ({_why_not}); using eager ops", stacklevel=3)
        return False
    _register_fakes()
    return True


def _build_and_load(directory: Path) -> None:
    """Compile ``SOURCE`` with ninja into ``directory`` (under our lock) and load the library."""
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    print(
        f"igulora: building the C++ CPU ops (once per environment, about 1 min) in {directory}",
        file=sys.stderr,
    )
    cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=list(CFLAGS),  # copies: cpp_extension appends to them
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def why_not() -> str | None:
    """Why the C++ ops did not load (None if they did or were never tried)."""
    return _why_not


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile and meta tensors can trace through the ops."""

    @torch.library.register_fake("igulora::score_update_")
    def _(ig, ibar, ubar, score, beta1, beta2, eps, mode):
        return None

    @torch.library.register_fake("igulora::triplet_scores")
    def _(score_A, score_E, score_B):
        return score_A.new_empty(score_A.shape[0])


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps, out=None):
    out = torch.empty_like(ibar) if out is None else out
    torch.ops.igulora.score_update_(ig, ibar, ubar, out, beta1, beta2, eps, SCORES.index(score))
    return out


def triplet_scores(score_A, score_E, score_B):
    return torch.ops.igulora.triplet_scores(score_A, score_E, score_B)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the C++ CPU ops ahead of use.")
    parser.add_argument("--build", action="store_true", help="build the ops now if needed")
    args = parser.parse_args(argv)
    directory = build_dir()
    if not args.build:
        print(f"{directory} ({'built' if _built(directory) else 'not built'})")
        return 0
    ok = load()
    print(f"C++ ops {'ready' if ok else 'unavailable: ' + str(why_not())} in {directory}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
