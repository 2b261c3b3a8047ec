"""Builds llada_ext._C and the kernel library with CMake + ninja (pip install [-e] .).

Environment: LLADA_CUDA=0 forces a CPU-only build, LLADA_CUDA=1 requires CUDA, unset builds
the CUDA kernels whenever nvcc is found; LLADA_CUDA_ARCHS (e.g. "90") narrows the targets;
LLADA_JOBS sets the build parallelism.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("LLADA_CUDA", "")
        build_dir = (
            ROOT
            / "build"
            / f"py{sys.version_info.major}{sys.version_info.minor}-cuda{cuda or 'auto'}"
        )
        cfg = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLLADA_PYTHON_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.check_call(cfg)
        # The Python package ships one unversioned kernel library: drop the versioned files a
        # build of an earlier layout may have left where setuptools packs the wheel from.
        for stale in out_dir.glob("libllada_kernels.so.*"):
            stale.unlink()
        jobs = os.environ.get("LLADA_JOBS", str(max(1, os.cpu_count() or 1)))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        # _C links to the kernel library next to it (RPATH $ORIGIN). setuptools copies only
        # the extension module into the source tree of an editable install, so the library
        # (and its soname links) and the executor module _C_emu follow it here.
        pkg_dir = ROOT / "llada_ext"
        if getattr(self, "editable_mode", False) and out_dir != pkg_dir:
            for stale in pkg_dir.glob("libllada_kernels.so.*"):
                stale.unlink()
            for lib in [*out_dir.glob("libllada_kernels.so*"), *out_dir.glob("_C_emu*.so")]:
                dst = pkg_dir / lib.name
                if dst.is_symlink() or dst.exists():
                    dst.unlink()
                shutil.copy2(lib, dst, follow_symlinks=False)


setup(ext_modules=[CMakeExtension("llada_ext._C")], cmdclass={"build_ext": CMakeBuild})
