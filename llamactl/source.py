"""``Source``: what every checkpoint reader returns (``convert``'s readers and ``gguf_format.read_gguf``), and what
every writer takes: the model config, the tokenizer bytes when it has them, and tensor plans named as llamactl
(Meta's) names, each produced on demand so that a conversion streams tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamactl.checkpoint import TensorPlan
from llamactl.model import ModelArgs
from llamactl.quant import QuantSpec


@dataclass
class Source:
    args: ModelArgs
    plans: list[TensorPlan]
    tokenizer: bytes | None
    lineage: dict
    dtype: torch.dtype  # the dtype the weights are stored in
    role: str | None = None  # a llamactl scalar-head checkpoint's role (helpfulness, safety, value)
    quant: QuantSpec | None = None  # a quantized llamactl checkpoint's scheme
    details: list[tuple[str, str]] = field(default_factory=list)  # format-specific lines for --info
