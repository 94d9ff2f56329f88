"""Build of moe_kernels.

``pip install .`` is pure Python (no torch needed at build time). With ``pip install --no-build-isolation .``,
a CUDA-enabled torch and nvcc, the CUDA extension ``moe_kernels._C`` is built from ``csrc/`` too.

Environment:
- ``MOE_KERNELS_BUILD_CUDA=0`` never builds the extension; ``=1`` builds it or fails; unset builds it
  when torch has CUDA and nvcc is found, and carries on without it if that build fails.
- ``TORCH_CUDA_ARCH_LIST`` as for any torch extension (default here ``8.0;9.0a``).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("MOE_KERNELS_BUILD_CUDA", "")


def _log(msg):
    print(f"moe_kernels setup: {msg}", file=sys.stderr)


def cuda_extension():
    """(ext_modules, cmdclass) for moe_kernels._C, or empty ones when it is not to be built."""
    if MODE == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if MODE == "1":
            raise RuntimeError("MOE_KERNELS_BUILD_CUDA=1 needs torch at build time: use pip install --no-build-isolation") from exc
        _log("torch not importable at build time: pure-Python install (no moe_kernels._C)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if MODE == "1":
            raise RuntimeError(f"MOE_KERNELS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}")
        _log("torch without CUDA or no nvcc: pure-Python install (no moe_kernels._C)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    ext = CUDAExtension(
        name="moe_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )

    class Build(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # an auto build that fails leaves a working pure-Python install
                if MODE == "1":
                    raise
                _log(f"building moe_kernels._C failed, continuing without it: {exc}")

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="moe_kernels",
    version="0.1.0",
    description="Fast kernels for Mixture-of-Experts layers: gating, permutation, grouped GEMM, fused MoE",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["moe_kernels", "moe_kernels.integrations", "moe_kernels.triton_kernels"],
    package_dir={"moe_kernels": "moe_kernels", "moe_kernels.triton_kernels": "triton_kernels"},
    package_data={"moe_kernels": ["_cpu_gemm.c"], "moe_kernels.triton_kernels": ["configs/*.json"]},
    install_requires=["torch>=2.11", "numpy>=1.24", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=5.0"],
        "bench": ["tqdm>=4", "matplotlib>=3.7"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
