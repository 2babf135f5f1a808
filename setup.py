"""Builds the optional CUDA extension ``kernels._cuda`` through CMake; everything else is in
pyproject.toml.

Knobs (environment variables):
    AVATAR_KERNELS_SKIP_CUDA_BUILD=1    pure-Python install, no CMake run
    AVATAR_KERNELS_CUDA_ARCHS="80;90"   CUDA architectures (CMake list syntax)
    AVATAR_KERNELS_REQUIRE_CUDA_BUILD=1 fail the install when the extension cannot be built
                                        (CI uses this where nvcc exists, so a broken csrc is red)

No nvcc, no CMake or a failed build gives a working pure-Python install: the registry then reports
"kernels._cuda is not available" as the reason the cuda backend cannot run, and Triton or the
reference take over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _find_cmake() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` wheel from build requirements
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        for ext in self.extensions:
            self._build(ext)

    def _warn_or_fail(self, message: str) -> None:
        if os.environ.get("AVATAR_KERNELS_REQUIRE_CUDA_BUILD") == "1":
            raise RuntimeError(message)
        print(f"avatar-kernels: {message}; installing without the CUDA extension", file=sys.stderr)

    def _build(self, ext: Extension) -> None:
        if os.environ.get("AVATAR_KERNELS_SKIP_CUDA_BUILD") == "1":
            print("avatar-kernels: AVATAR_KERNELS_SKIP_CUDA_BUILD=1, skipping kernels._cuda",
                  file=sys.stderr)
            return
        nvcc, cmake = _find_nvcc(), _find_cmake()
        if nvcc is None:
            return self._warn_or_fail("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        if cmake is None:
            return self._warn_or_fail("cmake not found")
        try:
            import pybind11
        except ImportError:
            return self._warn_or_fail("pybind11 not importable")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("AVATAR_KERNELS_CUDA_ARCHS", "80;90")
        configure = [
            cmake, str(ROOT), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        try:
            subprocess.run(configure, cwd=build_dir, check=True)
            subprocess.run([cmake, "--build", ".", "--parallel", str(os.cpu_count() or 2)],
                           cwd=build_dir, check=True)
        except subprocess.CalledProcessError as exc:
            return self._warn_or_fail(f"CUDA extension build failed ({exc})")
        return None


setup(ext_modules=[CMakeExtension("kernels._cuda")], cmdclass={"build_ext": CMakeBuild})
