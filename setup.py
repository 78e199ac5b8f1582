"""Builds the package and its compiled extension ``cbp_kernels._C``.

- C++ CPU kernels (csrc/cpu/*.cpp) are always built; AVX-512 paths inside them are chosen
  at run time, so one binary runs on any x86-64 CPU.
- CUDA kernels (csrc/cuda/*.cu) are added when the installed torch has CUDA and nvcc is
  found; the arch list defaults to sm_80 and sm_90 and ``TORCH_CUDA_ARCH_LIST`` overrides it.
- Set ``CBP_KERNELS_NO_EXT=1`` to install the pure-Python package only (the ops then run on
  their Triton / CuPy / reference backends).

Install with the torch already in the environment: ``pip install --no-build-isolation .``
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCudaSources(build_py):
    """Ships the raw CUDA kernel sources inside the package, for the CuPy JIT backend."""

    def run(self):
        super().run()
        for pattern in ("csrc/cuda/*.cuh", "csrc/common/*.h"):  # the .cuh files include common/
            for path in glob.glob(pattern):
                target = os.path.join(self.build_lib, "cbp_kernels", "_csrc", os.path.basename(os.path.dirname(path)))
                os.makedirs(target, exist_ok=True)
                shutil.copy(path, target)


def _extensions():
    if os.environ.get("CBP_KERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/register.cpp"]
    # -fno-math-errno (as torch is built): sqrtf without an errno branch, so loops using it vectorise.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "cbp_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "cbp_kernels._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithCudaSources, **cmdclass})
