"""SwiGLU gate of the feed-forward: silu(a) * b."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b
