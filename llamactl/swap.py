"""The one module-swap step: transforms applied to the meta-device model before a checkpoint's tensors are assigned.

Every model, loaded or trained, is made by ``build``: the model file describes the architecture only, and the transforms
a file or a use needs replace its ``nn.Linear`` layers while they are still shapes on the meta device, so a weight is
only ever materialised in the form that runs:

- ``quantized``: the checkpoint's header says its linear layers are int8/int4 (``llamactl.quant``): each becomes a
  ``QuantLinear`` whose tensors are the file's ``qweight``/``scales``/``zeros``;
- ``decode`` on a CPU: in small models q, k, v and w1, w3 are fused into one projection each (their tensors
  concatenated on the way in), and where it pays (``cpu_packing``) each floating-point projection becomes a
  ``PackedLinear`` holding oneDNN's blocked copy of its weight;
- ``lora`` (``llamactl.lora.add_lora``): a ``LoRALinear`` wraps each target linear (over a quantized one too), its
  adapter's tensors beside the base's; CPU decode fuses the wrapped projections with their adapters.

Modules with a ``prepare(dtype)`` method finish their work once the tensors are assigned (packing).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llamactl.lora import LoRALinear, LoraSpec, add_lora
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import QuantLinear, QuantSpec, quantize_linears, swap_linears


def build(args: ModelArgs, quant: QuantSpec | None = None, lora: LoraSpec | None = None) -> Transformer:
    """The one constructor of a model: ``args``'s architecture on the meta device, its linear layers quantized as
    ``quant`` says (a quantized checkpoint, a QLoRA base), then LoRA adapters over the ``lora`` targets. Loading for
    inference (``llamactl.loading``; then ``for_decode`` and ``finish``), training (``llamactl.training.lifecycle``),
    merging, quantizing and converting all start here; the checkpoint's tensors are assigned afterwards."""
    with torch.device("meta"):
        model = Transformer(args)
    if quant is not None:
        quantize_linears(model, quant)
    if lora is not None:
        add_lora(model, lora)
    return model


def _like(parts: list[nn.Module]) -> nn.Module:
    """An empty (meta) linear layer as wide as ``parts`` side by side, of their kind."""
    first, out = parts[0], sum(p.out_features for p in parts)
    if isinstance(first, QuantLinear):
        return QuantLinear(first.in_features, out, first.scheme, first.group_size, device="meta")
    return nn.Linear(first.in_features, out, bias=False, device="meta")


def fuse_projections(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse wq, wk, wv into ``wqkv`` and w1, w3 into ``w13`` in every block of a meta model; returns the tensors with
    the parts' tensors concatenated along the output dim (weights, quantized weights, scales and zero points alike).

    Parts wrapped in ``LoRALinear``s fuse into one ``LoRALinear`` over the fused base: its A is the parts' A stacked
    (sum of ranks, in), its B block-diagonal (sum of outs, sum of ranks), so each part's rows see only its own
    adapter; a part without one contributes rows of zeros.

    NOTE: three fewer calls per layer, ~0.5 ms of a 60M-preset decode step on this 2-core CPU."""
    tensors = dict(tensors)
    for i, layer in enumerate(model.layers):
        for owner, fused, parts in (
            (layer.attention, "wqkv", ("wq", "wk", "wv")),
            (layer.feed_forward, "w13", ("w1", "w3")),
        ):
            prefix = f"layers.{i}.{'attention' if owner is layer.attention else 'feed_forward'}"
            mods = [getattr(owner, p) for p in parts]
            base = _like([m.base if isinstance(m, LoRALinear) else m for m in mods])
            for key in base.state_dict():  # weight, or qweight/scales/zeros
                tensors[f"{prefix}.{fused}.{key}"] = torch.cat([tensors.pop(f"{prefix}.{p}.{key}") for p in parts])
            adapted = [(p, m) for p, m in zip(parts, mods, strict=True) if isinstance(m, LoRALinear)]
            if adapted:
                assert len({m.scale for _, m in adapted}) == 1, "the parts' adapters scale alike (one spec)"
                base = LoRALinear(base, sum(m.rank for _, m in adapted), adapted[0][1].scale)
                a = [tensors.pop(f"{prefix}.{p}.lora_A") for p, _ in adapted]
                b = {p: tensors.pop(f"{prefix}.{p}.lora_B") for p, _ in adapted}
                block = torch.zeros(base.out_features, base.rank, dtype=a[0].dtype)
                row = col = 0
                for p, m in zip(parts, mods, strict=True):
                    if p in b:
                        block[row : row + m.out_features, col : col + m.rank] = b[p]
                        col += m.rank
                    row += m.out_features
                tensors[f"{prefix}.{fused}.lora_A"], tensors[f"{prefix}.{fused}.lora_B"] = torch.cat(a), block
            setattr(owner, fused, base)
            for p in parts:
                delattr(owner, p)
    return tensors


class PackedLinear(nn.Module):
    """y = x @ W.T through oneDNN with W packed into its blocked layout once the weight is assigned (inference only,
    no autograd). A weight that is the checkpoint's own (memory-mapped, not converted) stays beside the packed copy:
    a compiled step (``llamactl.compiled``) multiplies by it, the compiler packing it its own way. A weight converted
    at load is dropped once packed (no second copy of the model)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device), requires_grad=False)
        self.packed: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedLinear:
        m = cls(weight.shape[1], weight.shape[0], device="meta")
        m.weight = nn.Parameter(weight.detach(), requires_grad=False)
        m.prepare(weight.dtype)
        return m

    def prepare(self, dtype: torch.dtype, keep_weight: bool = True) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        if not keep_weight:
            del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return nn.functional.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def cpu_packing(dtype: torch.dtype) -> bool:
    """Whether the CPU decode loader packs weights of ``dtype`` for oneDNN (``PackedLinear``), by what was measured.

    NOTE: ``python -P bench/decode_linears.py --rows 1`` (docs/benchmarks.md), torch 2.13, batch 1. On an AVX2 CPU
    (2-core AMD EPYC VM, 2026-12-08) oneDNN's packed fp32 products ran 1.2-2.3x faster than ``F.linear`` on every
    shape of the 60M and 1.1B presets (60M w13: 271 against 534 us; 60M head: 2.7 against 6.3 ms; 1.1B w13: 3.1
    against 5.2 ms), more at 8 rows, and oneDNN refuses to pack bf16 there. On an AVX-512 CPU with bf16 (2-core VM,
    2026-12-07) packing was 1.0-1.3x slower in fp32 and 1.0-1.4x slower in bf16 at every shape but the 60M w13 in
    bf16 (0.76x): plain ``F.linear`` there."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return torch.backends.cpu.get_cpu_capability() != "AVX512"


# NOTE: fusing q/k/v and w1/w3 saves three calls a layer (~0.5 ms of a 60M-preset decode step on a 2-core CPU) but
# concatenates their weights at load, a copy of most of the model (0.73 s of a 1.1B bf16 load, 2026-12-07). Above
# this width a step is bound by reading the weights, not by its calls, and the copy does not pay: see
# docs/benchmarks.md, "generate: where a 1.1B model's start goes".
FUSE_MAX_DIM = 1024


def for_decode(model: Transformer, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The CPU decode transform on a meta model: fused projections (small models), packed floating-point ones
    (where ``cpu_packing`` says it pays); returns the tensors renamed to fit. Quantized projections stay
    ``QuantLinear``s (they pick their CPU kernels in ``prepare``)."""
    if model.args.dim <= FUSE_MAX_DIM:
        tensors = fuse_projections(model, tensors)
    if cpu_packing(dtype):
        swap_linears(
            model,
            lambda name, m: (
                PackedLinear(m.in_features, m.out_features, device="meta")
                if name.startswith("layers.") and isinstance(m, nn.Linear)
                else None
            ),
        )
    return tensors


def finish(model: Transformer, dtype: torch.dtype, decode: bool, copied: set[str] = frozenset()) -> None:
    """After the tensors are assigned: each swapped module prepares its runtime form (a packed layer drops its weight
    when the weight's name is in ``copied``, the tensors converted at load); for CPU decode the output head gets a
    packed copy of its weight (the tied embedding's too) unless it is quantized."""
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            m.prepare(dtype, keep_weight=f"{name}.weight" not in copied)
        elif isinstance(m, QuantLinear):
            m.prepare(dtype)
    if decode and model.args.head == "lm" and not isinstance(getattr(model, "output", None), QuantLinear):
        if cpu_packing(dtype):
            model.packed_head = PackedLinear.of(model.output_weight)
