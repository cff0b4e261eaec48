"""Builds the CPU kernels in csrc/ into fastbml._C; installs without them if no compiler works."""

import glob
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - pybind11 is a build requirement
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Builds fastbml._C, but turns a missing/broken C++ compiler into a clear message."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # any compiler failure means "no cpp backend"
            self._explain(err)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            self._explain(err)

    @staticmethod
    def _explain(err):
        sys.stderr.write(
            "\n*** fastbml: the C++ CPU kernels (fastbml._C) could not be built:\n"
            f"***   {err}\n"
            "*** Installing without them: backend='cpp' will be unavailable and CPU tensors use\n"
            "*** the 'torch' path. Install g++ (with OpenMP) and run `pip install -e .` again.\n\n"
        )


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "fastbml._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
