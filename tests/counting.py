"""Count what a call runs on the device, on CPU: Triton launches (through the interpreter) and the torch
ops that compute (through the CPU profiler), plus the FLOPs of every ``tl.dot``.

A launch inside a ``triton_op`` is invisible to dispatch modes under the interpreter; a wrapper around
``InterpretedFunction.run`` sees each one, and ``torch.profiler`` sees the aten ops around it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# aten ops that compute nothing on the device (views, metadata, allocation without a fill)
_FREE = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape", "aten::_reshape_alias",
    "aten::as_strided", "aten::slice", "aten::select", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
    "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::contiguous", "aten::to", "aten::_to_copy_noop", "aten::result_type", "aten::size",
    "aten::stride", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::new_empty",
    "aten::new_empty_strided", "aten::unbind", "aten::split", "aten::chunk", "aten::narrow", "aten::unflatten",
    "aten::flatten", "aten::_unsafe_view", "aten::numpy_T", "aten::set_", "aten::data_ptr",
}
# fills of fresh outputs under MOE_KERNELS_POISON=1 (the suite's NaN poisoning): not part of the op
_POISON = {"aten::fill_"}
_LAUNCH = "triton_launch"


@dataclass
class Counts:
    launches: list = field(default_factory=list)  # kernel names, in order
    torch_ops: list = field(default_factory=list)  # computing aten ops (outermost only), in order
    dot_flops: int = 0

    @property
    def device_ops(self) -> int:
        return len(self.launches) + len(self.torch_ops)


@contextlib.contextmanager
def count_device_ops(poisoned: bool = True):
    """``with count_device_ops() as c: ...`` then ``c.launches``, ``c.torch_ops``, ``c.device_ops``, ``c.dot_flops``."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = Counts()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        counts.launches.append(self.fn.__name__)
        # the interpreter's own copies in and out of the launch are nested in this range, not device ops
        with record_function(_LAUNCH):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted_run
    from triton.runtime import interpreter as _interp

    orig_dot = _interp.interpreter_builder.create_dot

    def counted_dot(a, b, *args, **kwargs):
        shape_a, shape_b = a.data.shape, b.data.shape
        counts.dot_flops += 2 * shape_a[-2] * shape_a[-1] * shape_b[-1] * (shape_a[0] if len(shape_a) == 3 else 1)
        return orig_dot(a, b, *args, **kwargs)

    _interp.interpreter_builder.create_dot = counted_dot
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield counts
    finally:
        InterpretedFunction.run = run
        _interp.interpreter_builder.create_dot = orig_dot
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    ends = []  # outermost aten ops only: an op called inside another is part of it
    skip = _FREE | (_POISON if poisoned else set())
    for ev in events:
        if not ev.name.startswith("aten::") and ev.name != _LAUNCH:
            continue
        while ends and ends[-1] <= ev.time_range.start:
            ends.pop()
        nested = bool(ends)
        ends.append(ev.time_range.end)
        if nested or ev.name in skip or ev.name == _LAUNCH:
            continue
        counts.torch_ops.append(ev.name)
