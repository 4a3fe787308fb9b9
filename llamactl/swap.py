"""The one module-swap step: transforms applied to the meta-device model before a checkpoint's tensors are assigned.

Every model, loaded or trained, is made by ``build``: the model file describes the architecture only, and the transforms
a file or a use needs replace its ``nn.Linear`` layers while they are still shapes on the meta device, so a weight is
only ever materialised in the form that runs:

- ``quantized``: the checkpoint's header says its linear layers are int8/int4 (``llamactl.quant``): each becomes a
  ``QuantLinear`` whose tensors are the file's ``qweight``/``scales``/``zeros``;
- ``decode`` on a CPU: q, k, v and w1, w3 are fused into one projection each (their tensors concatenated on the way
  in), and each floating-point projection becomes a ``PackedLinear`` holding oneDNN's blocked copy of its weight;
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
    no autograd).

    NOTE: at batch 1 torch's fp32 F.linear runs a single-threaded matrix-vector product (8.2 GB/s of weights on this
    2-core machine) while oneDNN's packed inner product uses both cores (17.4 GB/s): decode is bound by reading the
    weights, so this is most of the decode speed-up. The packed copy replaces the weight, which the checkpoint keeps
    memory-mapped."""

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

    def prepare(self, dtype: torch.dtype) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def cpu_packing(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of ``dtype`` on this CPU."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def for_decode(model: Transformer, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The CPU decode transform on a meta model: fused projections, packed floating-point ones; returns the tensors
    renamed to fit. Quantized projections stay ``QuantLinear``s (they pick their CPU kernels in ``prepare``)."""
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


def finish(model: Transformer, dtype: torch.dtype, decode: bool) -> None:
    """After the tensors are assigned: each swapped module prepares its runtime form; for CPU decode the output head
    gets a packed copy of its weight (the tied embedding's too) unless it is quantized."""
    for m in model.modules():
        if isinstance(m, (PackedLinear, QuantLinear)):
            m.prepare(dtype)
    if decode and model.args.head == "lm" and not isinstance(getattr(model, "output", None), QuantLinear):
        if cpu_packing(dtype):
            model.packed_head = PackedLinear.of(model.output_weight)
