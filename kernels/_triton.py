"""The one place the kernel modules import Triton from, and the launch helpers they share.

Triton has no CPU backend: on a machine without CUDA the only way to run a kernel is Triton's interpreter, and it has
to be chosen before ``triton`` is first imported (Triton builds its own ``@jit`` helpers such as ``tl.sigmoid`` at
import time). So on such a machine this module turns the interpreter on unless the environment already says
otherwise. The dispatch in ``llamactl.ops`` never picks the kernels on the CPU unless ``LLAMACTL_KERNELS=triton``
asks for them, which is what the kernel tests do.

Where Triton is not installed at all (it ships for Linux only), ``HAS_TRITON`` is False, ``triton.jit`` leaves the
kernels as plain functions that are never launched, and the references keep working.
"""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for the ``triton`` module so the kernel files import; nothing here can launch a kernel."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None  # kernel bodies and their annotations are never evaluated without Triton


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1) rather than compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def inner_offsets_fit(*tensors: torch.Tensor) -> bool:
    """True when every element of each tensor's last two dims is addressed by an int32 offset from the start of its
    (batch, head) plane: the kernels compute batch and head offsets in int64 and the per-token offsets in int32."""
    return all((t.shape[-2] - 1) * t.stride(-2) + (t.shape[-1] - 1) * t.stride(-1) < 2**31 for t in tensors)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere, where every program instance is run
    one after the other by the interpreter and fewer of them is faster."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full fp32 for fp32 inputs (tests compare against fp32 torch, and TF32 would cost
    three decimal digits), the native tensor-core path for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"
