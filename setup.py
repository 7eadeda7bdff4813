"""Build entry point; metadata lives in pyproject.toml.

The C++ source lives in csrc/ at the top of the repository; build_py copies it into the
igu_kernels package, so a wheel (a non-editable install) can still compile the ops.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithCsrc(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "igu_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in CSRC.glob("*.cpp"):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
