"""TMA (Hopper's tensor memory accelerator) loads for the GEMM kernels, with the pointer path as the fallback.

The kernels build their descriptors in the kernel with ``tl.make_tensor_descriptor`` (spelled the same in
Triton 3.6 and 3.9; the interpreter runs it too) rather than taking host-side ``TensorDescriptor`` arguments:
torch.compile captures host descriptors only when dynamo traces the launch itself, not inside a
``torch.library.triton_op``, which is where every launch of this package is made. A weight ``[E, N, K]`` is
one rank-3 descriptor with ``[1, BLOCK_N, BLOCK_K]`` boxes, so the expert is a coordinate and the N and K
edges of each expert are zero-filled by the hardware exactly where the pointer path masks. Descriptors made
in the kernel need a small global scratch buffer per program (the tensor map): :func:`ensure_allocator`
installs a torch allocator for it when none is set (torch.compile's launcher installs its own).

Whether a launch may use TMA is decided on the host from what the tensors' metadata says (strides, storage
offset, base address), never from their values and never from the token count: :func:`descriptor_fits`.
When it fails (a stride that is not a multiple of 16 bytes, a non-contiguous inner dimension, an unaligned
view, a symbolic stride) the launch takes the pointer path, which reads any layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DIM = 2**31 - 1  # descriptor shapes and coordinates are int32
MAX_BOX = 256  # elements per dimension of one TMA box


def _aligned_base(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        return t.data_ptr() % 16 == 0
    except (RuntimeError, NotImplementedError, TypeError):  # fake or functional tensors: no address yet
        return True  # torch's allocators return 16-byte aligned storage; the storage offset is checked apart


def descriptor_fits(t: torch.Tensor, strides, dims, base_offset: int = 0) -> bool:
    """True when a descriptor over ``t``'s storage at ``base_offset`` elements past ``t``'s first element, with
    ``strides`` (elements, outermost first) and extents ``dims``, meets TMA's rules: last stride 1, the others
    positive multiples of 16 bytes, base 16-byte aligned, extents int32. Symbolic strides or offsets never
    qualify (no guard on them); a symbolic extent does (a row count: bounded by int32 as documented)."""
    es = t.element_size()
    offset = t.storage_offset()
    if not all(isinstance(v, int) for v in (*strides, base_offset, offset)):
        return False
    if strides[-1] != 1 or any(s <= 0 or (s * es) % 16 for s in strides[:-1]):
        return False
    if ((offset + base_offset) * es) % 16:
        return False
    if any(isinstance(d, int) and not 0 < d <= MAX_DIM for d in dims):
        return False
    return _aligned_base(t)


def weight_fits(w: torch.Tensor, k_major: bool, n: int, k: int, up_offset: int | None = None,
                n_stride: int | None = None) -> bool:
    """The weight descriptor(s) of :func:`weight_descriptors` for ``w [E, *, *]``: ``k_major`` when ``w[e]`` is
    ``[N, K]`` with K contiguous, else ``[K, N]`` with N contiguous; ``up_offset`` (elements) is the base of
    the up half of a gated weight; ``n_stride`` the stride between output columns (twice the row stride for
    interleaved gate/up rows)."""
    E = w.shape[0]
    if k_major:
        strides = (w.stride(0), n_stride if n_stride is not None else w.stride(1), w.stride(2))
        dims = (E, n, k)
    else:
        if n_stride is not None and n_stride != 1:  # interleaved columns: not a box
            return False
        strides, dims = (w.stride(0), w.stride(1), w.stride(2)), (E, k, n)
    ok = descriptor_fits(w, strides, dims)
    return ok and (up_offset is None or descriptor_fits(w, strides, dims, up_offset))


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator(device: torch.device) -> None:
    """Install a torch allocator for the tensor maps of in-kernel descriptors if none is set (the default
    raises at launch). Allocations come from the caching allocator on the current stream's device, which the
    launch path has entered; under CUDA-graph capture they come from the graph's pool."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current.get(), null):
        triton.set_allocator(_tma_allocator)


@triton.jit
def weight_descriptor(w_ptr, num_experts, N, K, stride_we, stride_n, stride_k, KMAJOR: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rank-3 descriptor of a weight ``[E, N, K]`` (``KMAJOR``: K contiguous, ``stride_k`` is 1) or ``[E, K, N]``
    (N contiguous, ``stride_n`` is 1): one ``[1, BN, BK]`` (or ``[1, BK, BN]``) box per load."""
    if KMAJOR:  # (one branch compiled: the other's stride is the constant 1)
        desc = tl.make_tensor_descriptor(w_ptr, [num_experts, N, K], [stride_we, stride_n, 1], [1, BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(w_ptr, [num_experts, K, N], [stride_we, stride_k, 1], [1, BLOCK_K, BLOCK_N])
    return desc


@triton.jit
def weight_tile(desc, e, n0, k0, KMAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BK, BN]`` tile (K rows ``k0...``, columns ``n0...``) of expert ``e``'s weight, zero past its edges."""
    if KMAJOR:
        tile = tl.trans(tl.reshape(desc.load([e.to(tl.int32), n0.to(tl.int32), k0]), [BLOCK_N, BLOCK_K]))
    else:
        tile = tl.reshape(desc.load([e.to(tl.int32), k0, n0.to(tl.int32)]), [BLOCK_K, BLOCK_N])
    return tile
