"""Device, dtype and seed choices shared by every command."""

from __future__ import annotations

import random

import torch

from llamactl.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda was asked for but no CUDA device is available")
    return dev


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPUs with AVX512-BF16 / AMX run bf16 matmuls natively (about 4x fp32 here); others emulate it slowly.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype to run a model in: ``auto`` keeps its checkpoint's ``stored`` dtype where the device runs it
    natively (so an fp32 checkpoint decodes as transformers and llama.cpp decode it); fp16 on a CPU becomes bf16
    where that is native, and anything else fp32."""
    if name == "auto":
        if stored == torch.float16 and device.type == "cpu":
            stored = torch.bfloat16
        if stored == torch.bfloat16 and not bf16_supported(device):
            return torch.float32
        return stored if stored in DTYPE_NAMES else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
