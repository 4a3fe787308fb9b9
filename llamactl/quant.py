"""Weight-only quantization: what a quantized checkpoint says about itself, the runtime linear layer, and the
quantizers (round-to-nearest and GPTQ) that make one.

A quantized checkpoint holds, for each quantized ``nn.Linear`` named ``X`` (``layers.0.attention.wq`` ...), the
tensors ``X.qweight``, ``X.scales`` and, for int4, ``X.zeros`` in place of ``X.weight``, and its header's
``quantization`` entry (a ``QuantSpec``) says how. Embeddings and norms always stay in floating point, the output
head unless the spec's ``head`` says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from llamactl.errors import UserError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's linear layers are quantized (its header's ``quantization`` entry)."""

    scheme: str  # int8: symmetric per output channel; int4: asymmetric per group of group_size inputs
    group_size: int | None = None  # int4 only
    method: str = "rtn"  # rtn: round to nearest; gptq: error-correcting, from calibration text
    head: bool = False  # the output head quantized too
    source_sha256: str = ""  # the floating-point checkpoint it was made from

    def problems(self) -> list[str]:
        out = []
        if self.scheme not in SCHEMES:
            out.append(f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        elif self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            out.append(f"int4 group size {self.group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")
        elif self.scheme == "int8" and self.group_size is not None:
            out.append("int8 is per output channel and takes no group size")
        if self.method not in METHODS:
            out.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if type(self.head) is not bool:
            out.append(f"head {self.head!r} is not true or false")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str) -> QuantSpec:
        try:
            doc = json.loads(text)
            spec = cls(**doc)
        except (ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{source}: damaged checkpoint header (quantization: {str(e)[:160]})") from None
        problems = spec.problems()
        if problems:
            raise UserError(f"{source}: damaged checkpoint header (quantization: {'; '.join(problems)})")
        return spec

    def describe(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        return f"{self.scheme}{group} ({self.method}{', head too' if self.head else ''})"
