"""Weight-only quantization: what a quantized checkpoint says about itself, the runtime linear layer, and the
quantizers (round-to-nearest and GPTQ) that make one.

A quantized checkpoint holds, for each quantized ``nn.Linear`` named ``X`` (``layers.0.attention.wq`` ...), the
tensors ``X.qweight``, ``X.scales`` and, for int4, ``X.zeros`` in place of ``X.weight``, and its header's
``quantization`` entry (a ``QuantSpec``) says how. Embeddings and norms always stay in floating point, the output
head unless the spec's ``head`` says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from llamactl import ops
from llamactl.errors import UserError
from llamactl.kernels.quant_matmul import (
    GROUP_SIZES,
    SCHEMES,
    dequantize,
    int4_params,
    pack_int4,
    quantize,
    quantize_int8,
    unpack_int4,
)

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
        elif self.scheme == "int4" and (type(self.group_size) is not int or self.group_size not in GROUP_SIZES):
            out.append(f"int4 group size {self.group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")
        elif self.scheme == "int8" and self.group_size is not None:
            out.append("int8 is per output channel and takes no group size")
        if self.method not in METHODS:
            out.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if type(self.head) is not bool:
            out.append(f"head {self.head!r} is not true or false")
        if not isinstance(self.source_sha256, str):
            out.append(f"source_sha256 {self.source_sha256!r} is not text")
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


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear`` (no bias, frozen: gradients flow to its input only, for QLoRA):
    ``qweight``, ``scales`` and, for int4, ``zeros`` in the formats of ``llamactl.kernels.quant_matmul``.

    On CUDA it runs the Triton kernels (through ``ops.quant_matmul``). On a CPU, ``prepare`` converts the weight once
    to torch's own weight-packed layouts: ``_weight_int8pack_mm`` for int8, ``_weight_int4pack_mm_for_cpu`` for int4.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group_size = (
            in_features,
            out_features,
            scheme,
            group_size,
        )
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float16, device=device))
            self.zeros = None
        else:
            assert scheme == "int4" and group_size and in_features % group_size == 0, (scheme, group_size)
            groups = in_features // group_size
            self.register_buffer(
                "qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self._cpu: tuple | None = None  # the CPU kernel's operands, made by prepare()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"

    def prepare(self, dtype: torch.dtype) -> None:
        """Make the CPU kernel's operands for activations of ``dtype`` (a no-op off the CPU, and for fp32).

        NOTE: torch 2.13's int8/int4 weight-packed CPU kernels are fast in bf16 only: for a 2752 x 512 layer here,
        int8 took 50 us at batch 1 and 5.1 ms for 256 rows in bf16, 590 us and 155 ms in fp32 (int4: 62 us / 4.6 ms
        against 1.2 ms / 312 ms). Dequantizing and multiplying in fp32 (the reference) takes 0.45 ms and 5.6 ms: fp32
        activations run that."""
        if self.qweight.device.type != "cpu" or dtype == torch.float32:
            return
        if self.scheme == "int8" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            if self.qweight.data_ptr() % 64:
                # NOTE: torch 2.13's bf16 int8 kernel crashes (SIGSEGV) on a weight not 64-byte aligned, as a tensor
                # memory-mapped from a safetensors file can be; torch's own allocations are aligned
                self.qweight = self.qweight.clone()
            self._cpu = ("int8", self.scales.to(dtype))
        elif (
            self.scheme == "int4"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and self.out_features % 16 == 0
        ):
            # (torch's int4 packing takes output dims in multiples of 16; others run the reference)
            levels = unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
            # torch's int4 kernels compute (q - 8) * scale + zero: our (q - z) * s is zero = (8 - z) * s
            s = self.scales.float()
            scale_zero = torch.stack([s.t(), ((8 - self.zeros.float()) * s).t()], dim=-1).contiguous()  # (K/G, N, 2)
            self._cpu = ("int4", packed, scale_zero.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: adapters train through the frozen layer
            return _QuantLinearGrad.apply(x, self)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu is None or x.device.type != "cpu":
            return ops.quant_matmul(x, self.qweight, self.scales, self.zeros, self.scheme)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._cpu[0] == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self._cpu[1].to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._cpu[1], self.group_size, self._cpu[2].to(x.dtype))
        return y.view(*shape[:-1], self.out_features)


class _QuantLinearGrad(torch.autograd.Function):
    """A ``QuantLinear``'s forward with a gradient for its input: dx = dy @ dequant(W), in fp32, then x's dtype (the
    kernels and torch's packed CPU ops have no backward; the weight, frozen, gets none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer = ctx.layer
        w = dequantize(layer.qweight, layer.scales, layer.zeros, layer.scheme)  # (N, K) fp32
        return (dy.float() @ w).to(ctx.x_dtype), None


@dataclass
class Quantized:
    """One linear layer's quantized tensors (named as ``QuantLinear``'s buffers) and its error."""

    tensors: dict[str, torch.Tensor]
    max_error: float  # largest |W - dequant(W)|
    rel_error: float  # ||W - dequant(W)||_F / ||W||_F
    out_error: float | None = None  # sqrt(tr(dW H dW^T) / tr(W H W^T)): the relative output error on calibration

    def dequantized(self, scheme: str) -> torch.Tensor:
        t = self.tensors
        return dequantize(t["qweight"], t["scales"], t.get("zeros"), scheme)


def _errors(w: torch.Tensor, back: torch.Tensor, h: torch.Tensor | None) -> tuple[float, float, float | None]:
    d = back - w
    rel = (d.norm() / w.norm().clamp(min=1e-30)).item()
    out = None
    if h is not None:
        out = ((d @ h * d).sum() / (w @ h * w).sum().clamp(min=1e-30)).clamp(min=0).sqrt().item()
    return d.abs().max().item(), rel, out


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Round to nearest: int8 per output channel, int4 per group (``llamactl.kernels.quant_matmul``)."""
    w = weight.float()
    q, scales, zeros, _ = quantize(w, spec.scheme, spec.group_size)
    tensors = {"qweight": q, "scales": scales} | ({"zeros": zeros} if zeros is not None else {})
    out = Quantized(tensors, 0.0, 0.0)
    out.max_error, out.rel_error, _ = _errors(w, out.dequantized(spec.scheme), None)
    return out


def quantize_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01, name: str | None = None
) -> Quantized:
    """GPTQ (Frantar et al., 2022): quantize the columns of W (N, K) one at a time, in input order, each time
    spreading the rounding error over the columns not yet quantized so as to minimise ||X W^T - X Q^T||^2 over the
    calibration inputs X, whose statistics are ``hessian`` = X^T X (K, K).

    Steps: columns no input ever reached are zeroed; H gets ``damp`` x its mean diagonal added (its conditioning);
    U is the upper Cholesky factor of H^-1, whose row i gives, over the remaining columns, how column i's error is
    corrected. int4 group parameters are set (round to nearest over the group's current, already corrected weights)
    when the group's first column comes up; int8 scales are set per row up front. Columns go in blocks of 128 with
    the correction of later blocks applied once per block (the paper's lazy batch update)."""
    W = weight.float().clone()
    N, K = W.shape
    H = hessian.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    eye, mean = torch.eye(K, device=H.device), torch.diagonal(H).mean()
    for more in (1, 10, 100):  # an ill-conditioned X^T X gets more damping before it is given up
        try:
            U = torch.linalg.cholesky(
                torch.cholesky_inverse(torch.linalg.cholesky(H + damp * more * mean * eye)), upper=True
            )
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise UserError(f"GPTQ: the calibration inputs of {name or 'a layer'} are too degenerate to invert X^T X even "
                        f"damped by {100 * damp}; give more varied calibration text or a larger --damp")  # fmt: skip
    levels = torch.empty(N, K, dtype=torch.int16, device=W.device)
    if spec.scheme == "int8":
        scales = quantize_int8(W)[1]
        zeros = None
    else:
        G = spec.group_size
        scales = torch.empty(N, K // G, dtype=torch.float16, device=W.device)
        zeros = torch.empty(N, K // G, dtype=torch.uint8, device=W.device)
    block = 128
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        Wb, Eb = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device)
        for i in range(b1 - b0):
            col = b0 + i
            if spec.scheme == "int8":
                s, z = scales.float(), None
                q = torch.round(Wb[:, i] / s).clamp_(-127, 127)
                back = q * s
            else:
                g = col // spec.group_size
                if col % spec.group_size == 0:  # groups of 32/64/128 never straddle a 128-column block
                    scales[:, g], zeros[:, g] = int4_params(Wb[:, i : i + spec.group_size])
                s, z = scales[:, g].float(), zeros[:, g].float()
                q = (torch.round(Wb[:, i] / s) + z).clamp_(0, 15)
                back = (q - z) * s
            levels[:, col] = q.to(torch.int16)
            err = (Wb[:, i] - back) / U[col, col]
            Wb[:, i:] -= err[:, None] * U[col, col:b1][None, :]
            Eb[:, i] = err
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    if spec.scheme == "int8":
        tensors = {"qweight": levels.to(torch.int8), "scales": scales}
    else:
        tensors = {"qweight": pack_int4(levels.to(torch.uint8)), "scales": scales, "zeros": zeros}
    out = Quantized(tensors, 0.0, 0.0)
    w = weight.float()
    out.max_error, out.rel_error, out.out_error = _errors(w, out.dequantized(spec.scheme), hessian.float())
    return out


def undivided_dims(args, group_size: int | None) -> list[str]:
    """The input dims of a model's block linears ("dim 4096", "hidden_dim 11008") that groups of ``group_size``
    inputs do not divide (none for int8, whose scales are per output channel)."""
    dims = {"dim": args.dim, "hidden_dim": args.hidden_dim}
    return [f"{k} {v}" for k, v in dims.items() if group_size and v % group_size]


def linear_names(args, spec: QuantSpec) -> list[str]:
    """The checkpoint names (without ``.weight``) of the linear layers ``spec`` quantizes, in model order."""
    names = [
        f"layers.{i}.{part}"
        for i in range(args.n_layers)
        for part in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    ]
    return names + (["output"] if spec.head else [])


class _Inputs:
    """X^T X of the inputs each watched linear layer receives, accumulated over forward passes (fp32). Layers fed the
    same tensor (wq, wk, wv; w1, w3) share one product."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.h: dict[str, torch.Tensor] = {}
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # the latest input and its X^T X
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.last is None or self.last[0] is not inputs[0]:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                self.last = (inputs[0], x.t() @ x)
            xtx = self.last[1]
            self.h[name] = self.h[name] + xtx if name in self.h else xtx

        return hook

    def close(self) -> None:
        self.last = None
        for h in self.hooks:
            h.remove()


def quantize_calibrated(
    model, sequences: torch.Tensor, spec: QuantSpec, damp: float, batch_size: int, report
) -> dict[str, Quantized]:
    """GPTQ over a floating-point ``model`` (fp32, eval mode), block by block: the calibration ``sequences`` (S, T)
    run through block i with its original weights to collect each projection's input statistics, its projections
    are quantized, and the block is run again with the quantized weights to give block i + 1 its inputs, so that
    each block corrects for the error of those before it. ``report(name, Quantized)`` is called as each layer is done.
    The model's weights are overwritten with their dequantized values."""
    device = model.tok_embeddings.weight.device
    S, T = sequences.shape
    positions = torch.arange(T, device=device)[None, :]
    cos, sin = model.rope_cos, model.rope_sin
    out: dict[str, Quantized] = {}

    def run_block(layer, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(h, cos, sin, positions.expand(h.shape[0], T)) for h in hs]

    def quantize(modules: dict[str, nn.Linear], h: dict[str, torch.Tensor]) -> None:
        for name, m in modules.items():
            q = quantize_gptq(m.weight.data, h[name], spec, damp, name)
            m.weight.data.copy_(q.dequantized(spec.scheme).to(m.weight.dtype))
            out[name] = q
            report(name, q)

    with torch.no_grad():
        hs = [model.tok_embeddings(sequences[i : i + batch_size].to(device)) for i in range(0, S, batch_size)]
        names = linear_names(model.args, spec)
        for i, layer in enumerate(model.layers):
            modules = {n: model.get_submodule(n) for n in names if n.startswith(f"layers.{i}.")}
            watch = _Inputs(modules)
            run_block(layer, hs)
            watch.close()
            quantize(modules, watch.h)
            hs = run_block(layer, hs)
        if spec.head:
            watch = _Inputs({"output": model.output})
            for h in hs:
                model.output(model.norm(h))
            watch.close()
            quantize({"output": model.output}, watch.h)
    return out


def swap_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace each linear layer (``nn.Linear`` or ``QuantLinear``) for which ``make(name, module)`` returns a module;
    returns the names replaced."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, QuantLinear)):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                new = make(name, child)
                if new is not None:
                    setattr(parent, child_name, new)
                    swapped.append(name)
    return swapped


def quantize_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    """The linear layers a quantized checkpoint stores quantized, as ``QuantLinear``s: every projection of every
    block, and the output head when ``spec.head`` (never the scalar head of a reward model: one row)."""

    names = set(linear_names(model.args, spec))

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if name in names:
            return QuantLinear(m.in_features, m.out_features, spec.scheme, spec.group_size, device=m.weight.device)
        return None

    return swap_linears(model, make)
