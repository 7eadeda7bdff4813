"""A wheel (a non-editable install) carries the C++ source and builds the ops from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_wheel_ships_the_cpp_source_and_an_installed_copy_builds_the_ops(tmp_path):
    pip = (sys.executable, "-m", "pip")
    _run(*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"))
    wheel = next((tmp_path / "dist").glob("igulora-*.whl"))
    assert "igu_kernels/csrc/igulora_ops.cpp" in zipfile.ZipFile(wheel).namelist()

    site = tmp_path / "site"
    _run(*pip, "install", "--no-deps", "--target", str(site), str(wheel))
    code = "import igu_kernels, igu_kernels.cpp as c; print(c.SOURCE, igu_kernels.available_backends())"
    env = {**os.environ, "PYTHONPATH": str(site), "IGULORA_CPP_CACHE": str(tmp_path / "cache")}
    source, backends = _run(sys.executable, "-c", code, cwd=tmp_path, env=env).stdout.split(" ", 1)
    assert Path(source).is_relative_to(site)  # the installed copy, not this checkout
    assert "cpp" in backends


def test_the_core_imports_no_trainer_trl_or_accelerate():
    """Integrations live in igulora.integrations; importing the core pulls none of them in."""
    code = (
        "import sys, igulora, igulora.model, igulora.allocator, igulora.cli, igulora.pretrained\n"
        "heavy = ('trl', 'accelerate', 'transformers.trainer', 'igulora.integrations.trainer')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
