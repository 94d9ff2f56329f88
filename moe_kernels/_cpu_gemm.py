"""Launcher of the CPU grouped GEMMs in ``_cpu_gemm.c`` (few rows per expert): built on first use, called by ctypes.

BLAS products of a few rows against an expert's ``[N, K]`` weights run far below the memory bandwidth (MKL fp32
on a 2-core AVX2 VM, measured: 3-5 GB/s at 1-16 rows against 12-24 GB/s for a plain read);
these kernels stream each expert's weights once per block of 4 rows, all experts in one OpenMP loop.
``bench/cpu_gemm.py`` measures both at model shapes.

The C file is compiled like Triton's launcher: with the system C compiler (``$CC``, else ``cc``) at first use,
``-O3 -march=native``, into ``$MOE_KERNELS_CACHE_DIR`` (default ``~/.cache/moe_kernels``) under a name keyed by the
source, the compiler, the flags, the CPU's flags and the OpenMP runtime. It links the OpenMP runtime torch has
loaded (read from ``/proc/self/maps``), so its threads are torch's intra-op threads (``torch.set_num_threads``).
Without an OpenMP runtime in the process (no ``/proc``, or several runtimes and none of them torch's) they are
built single-threaded. No compiler, a failed build or ``MOE_KERNELS_CPU_GEMM=0``: :func:`lib` is None (one
warning says why, unless disabled) and the CPU path keeps torch's GEMMs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_cpu_gemm.c")
# The most rows per expert the kernels take; experts with more rows go to BLAS, whose packed kernels win from
# 32-64 rows on (bench/cpu_gemm.py; bench moe on 1 and 2 threads, 2-core AVX2 EPYC).
MAX_ROWS = 32
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
PLAIN = (torch.Tensor, torch.nn.Parameter)  # no subclasses: the kernels read raw storage
_OMP_NAMES = ("libgomp", "libiomp5", "libomp")
_state: dict = {}

_I64, _P, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_ARGS = {  # pointer arguments are ints (data_ptr) or None; the last one is the thread count
    "gemm": [_INT, _P, _I64, _P, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT],
    "wgrad": [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT],
}


def _omp_runtime() -> str | None:
    """The path of the OpenMP runtime loaded in this process, torch's own first, or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.rsplit(None, 1)[-1] for line in f if " /" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if Path(p).name.startswith(_OMP_NAMES) and ".so" in Path(p).name)
    torch_dir = str(Path(torch.__file__).parent)
    # torch's own; else the only one loaded; with several and none of torch's, none (rather than a second pool)
    return next((p for p in found if p.startswith(torch_dir)), found[0] if len(found) == 1 else None)


def _cache_dir() -> Path:
    root = os.environ.get("MOE_KERNELS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "moe_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(fresh: bool = False) -> Path:
    """Compile the kernels (or find them in the cache unless ``fresh``); the shared library's path. Raises on
    failure. Without an OpenMP runtime in the process the kernels are built single-threaded."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        raise RuntimeError("no C compiler (set CC or install cc)")
    cc = shlex.split(found)  # CC may carry a launcher or flags ("ccache gcc")
    omp = _omp_runtime()
    flags = ["-O3", "-march=native", "-fPIC", "-fno-math-errno", "-std=gnu11"] + (["-fopenmp"] if omp else [])
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(), (omp or "").encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemm-{key}.so"
    if out.exists() and not fresh:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "cpu_gemm.o", Path(tmp) / "cpu_gemm.so"
        for cmd in ([*cc, *flags, "-c", str(SOURCE), "-o", str(obj)],
                    [*cc, "-shared", str(obj), *([omp] if omp else []), "-o", str(lib)]):
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip()[-400:]}")
        os.replace(lib, out)  # atomic: a concurrent build of the same key writes the same file
    return out


def lib():
    """The loaded kernels (a ``ctypes.CDLL`` with argument types set), or None when they cannot be used."""
    if "lib" in _state:
        return _state["lib"]
    _state["lib"] = None
    if os.environ.get("MOE_KERNELS_CPU_GEMM", "1") == "0":
        return None
    try:
        try:
            handle = ctypes.CDLL(str(_build()))
        except OSError:  # a cached build that no longer loads (torch's runtime changed under it): build it again
            handle = ctypes.CDLL(str(_build(fresh=True)))
        for name, args in _ARGS.items():
            for suf in DTYPES.values():
                fn = getattr(handle, f"moe_{name}_{suf}")
                fn.argtypes, fn.restype = args, None
        _state["lib"] = handle
    except Exception as exc:  # any failure leaves torch's GEMMs in place
        warnings.warn(f"moe_kernels: the CPU grouped GEMM kernels are not available ({exc}); the CPU path uses "
                      "torch's GEMMs", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def bounds_array(bounds: list[int]):
    """Row bounds of the experts as the C kernels read them (int64)."""
    return (ctypes.c_int64 * len(bounds))(*bounds)


def _expect(ok: bool, name: str, *tensors: torch.Tensor) -> None:
    """The kernels read raw pointers: a mismatch is a ValueError here, never an access out of bounds."""
    if not ok:
        desc = ", ".join(f"{tuple(t.shape)} {t.dtype} strides {t.stride()}" for t in tensors)
        raise ValueError(f"_cpu_gemm.{name}: inconsistent tensors ({desc})")


def _expect_bounds(bounds, E: int, rows: int) -> None:
    if len(bounds) != E + 1 or bounds[0] < 0 or bounds[E] > rows:
        raise ValueError(f"_cpu_gemm: bounds must be E + 1 = {E + 1} row offsets within 0..{rows}, got "
                         f"{len(bounds)} ending at {bounds[len(bounds) - 1] if len(bounds) else None}")


def _fn(name: str, dtype: torch.dtype):
    return getattr(lib(), f"moe_{name}_{DTYPES[dtype]}")


def _kind(wt: torch.Tensor) -> str | None:
    """``nt``: ``wt [E, K, N]`` has a unit stride along K (dot products), ``nn``: along N (broadcast FMAs)."""
    return "nt" if wt.stride(1) == 1 else "nn" if wt.stride(2) == 1 else None


def gemm_rows(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The most rows per expert :func:`gemm` computes for these tensors (0: it cannot take them): fp32 or fp64
    throughout, ``wt [E, K, N]`` with a unit stride along K or N, unit column strides elsewhere (the output:
    ``x``'s dtype, unit column stride)."""
    if (x.dim() != 2 or wt.dim() != 3 or x.dtype not in DTYPES or wt.dtype != x.dtype or x.stride(1) != 1
            or (bias is not None and (type(bias) not in PLAIN or bias.dtype != x.dtype or bias.stride(1) != 1))
            or lib() is None):  # dtypes first: a bf16 caller never builds the kernels
        return 0
    return 0 if _kind(wt) is None else MAX_ROWS


def gemm(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, bounds, y: torch.Tensor, max_rows: int) -> None:
    """``y[r] = x[r] @ wt[e] (+ bias[e])`` for the rows of every expert with at most ``max_rows`` rows (at most
    :func:`gemm_rows`; the rows of other experts are not written). ``x [n, K]``, ``wt [E, K, N]``, ``y [n, N]``."""
    E, K, N = wt.shape
    _expect(x.shape[1] == K and tuple(y.shape) == (x.shape[0], N) and y.dtype == x.dtype and y.stride(1) == 1
            and (bias is None or tuple(bias.shape) == (E, N)), "gemm", x, wt, y)
    _expect_bounds(bounds, E, x.shape[0])
    se, sk, sn = wt.stride()
    nt = _kind(wt) == "nt"
    _fn("gemm", x.dtype)(int(nt), x.data_ptr(), x.stride(0), wt.data_ptr(), se, sn if nt else sk,
                         None if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
                         y.data_ptr(), y.stride(0), bounds, E, N, K, max_rows, torch.get_num_threads())


def wgrad_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most rows per expert :func:`wgrad` takes for these tensors (0: it cannot take them; the output:
    contiguous, ``a``'s dtype)."""
    if a.dtype not in DTYPES or b.dtype != a.dtype or a.stride(1) != 1 or b.stride(1) != 1 or lib() is None:
        return 0
    return MAX_ROWS


def wgrad(a: torch.Tensor, b: torch.Tensor, bounds, out: torch.Tensor, max_rows: int) -> None:
    """``out[e] = a_e^T @ b_e`` over the rows of expert e, zeros for experts without rows, for every expert with at
    most ``max_rows`` rows (at most :func:`wgrad_rows`; other experts are not written). ``a [n, I]``,
    ``b [n, J]``, ``out [E, I, J]``."""
    E, I, J = out.shape
    _expect(a.shape[0] == b.shape[0] and (a.shape[1], b.shape[1]) == (I, J) and out.dtype == a.dtype
            and out.is_contiguous(), "wgrad", a, b, out)
    _expect_bounds(bounds, E, a.shape[0])
    _fn("wgrad", a.dtype)(a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), out.data_ptr(), bounds, E, I, J,
                          max_rows, torch.get_num_threads())
