"""The C++ ops' build cache: one build per environment, never a hang, never a rebuild loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igu_kernels import cpp

ROOT = Path(__file__).resolve().parents[1]
LOAD = "from igu_kernels import cpp; print(cpp.load(), cpp.why_not())"
NO_BUILD = "import torch.utils.cpp_extension as c; c.load = c.verify_ninja_availability = None; "
fcntl = pytest.importorskip("fcntl")


def _loader(cache: Path, *, prelude: str = "", **env: str) -> subprocess.Popen:
    """A fresh process that loads the ops from ``cache`` (its own session: killable as a group)."""
    return subprocess.Popen(
        [sys.executable, "-c", prelude + LOAD],
        env={**os.environ, "IGULORA_CPP_CACHE": str(cache), **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    return out, err


def _compiles(directory: Path) -> int:
    """How many times ninja compiled the source in ``directory``."""
    log = directory / ".ninja_log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(line.split("\t")[3:4] == ["igulora_ops.o"] for line in lines)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGULORA_CPP_CACHE", str(tmp_path))
    return tmp_path


def test_processes_started_together_share_one_build_and_later_ones_reuse_it(cache):
    first, second = _loader(cache), _loader(cache)
    results = [_finish(first), _finish(second)]
    assert all(out.startswith("True") for out, _ in results), results
    assert sum("building the C++ CPU ops" in err for _, err in results) == 1
    out, err = _finish(_loader(cache))
    assert out.startswith("True") and "building" not in err
    assert _compiles(cpp.build_dir()) == 1
    out, err = _finish(_loader(cache, prelude=NO_BUILD))  # a built library loads without ninja
    assert out.startswith("True"), (out, err)
    (cpp.build_dir() / f"{cpp.NAME}.so").unlink()
    out, _ = _finish(_loader(cache, prelude=NO_BUILD))  # ...and only a built one does
    assert out.startswith("False TypeError"), out


def test_a_build_killed_midway_never_blocks_the_next_process(cache):
    directory = cpp.build_dir()
    first = _loader(cache)
    deadline = time.monotonic() + 120
    while not (directory / "lock").exists():  # cpp_extension's lock: the build has started
        assert time.monotonic() < deadline and first.poll() is None, "the build never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the process, ninja and the compiler
    first.wait()
    assert (directory / "lock").exists()  # what made every later process wait forever
    out, err = _finish(_loader(cache), timeout=600)
    assert out.startswith("True"), err
    assert "left by a C++ build that was killed" in err


def test_a_live_build_elsewhere_is_waited_for_within_a_bound(cache):
    directory = cpp.build_dir()
    with open(directory / "igulora.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("process 4242")
        held.flush()
        started = time.monotonic()
        out, err = _finish(_loader(cache, IGULORA_CPP_WAIT_S="1"), timeout=120)
    assert time.monotonic() - started < 60
    assert "waiting for process 4242, which is building or loading the C++ ops" in err
    assert out.startswith("False TimeoutError") and "IGULORA_CPP_WAIT_S" in out
    assert "C++ CPU ops unavailable" in err  # the one warning; igulora runs on eager


def test_the_build_key_covers_what_changes_the_build(monkeypatch):
    key = cpp.build_key()
    assert cpp.build_key() == key
    changes = [
        lambda: monkeypatch.setattr(cpp, "_compiler", lambda: "g++-99 (other) 99.0"),
        lambda: monkeypatch.setattr(cpp, "CFLAGS", [*cpp.CFLAGS, "-DOTHER"]),
        lambda: monkeypatch.setattr(cpp.sysconfig, "get_paths", lambda: {"include": "/other/python"}),
        lambda: monkeypatch.setattr(cpp.torch, "__file__", "/other/venv/torch/__init__.py"),
    ]
    keys = {key}
    for change in changes:
        change()
        keys.add(cpp.build_key())
    assert len(keys) == len(changes) + 1


def test_prebuild_command_reports_the_directory(cache, capsys):
    assert cpp.main([]) == 0
    assert str(cpp.build_dir()) in capsys.readouterr().out
