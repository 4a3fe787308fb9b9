"""LoRA (Hu et al., 2021): low-rank adapters on the frozen block linears of a model, and the adapter file.

An adapter adds ``scale * B A x`` (``scale = alpha / rank``) to the output of each target linear layer ``W`` of
every block (``wq wk wv wo w1 w2 w3``); ``A`` (rank, in) starts as PEFT's default (Kaiming-uniform, a = sqrt(5))
and ``B`` (out, rank) at zero, so a fresh adapter changes nothing.

Names. ``add_lora`` wraps each target in a ``LoRALinear`` (through ``quant.swap_linears``, on a meta or a
materialised model). The wrapper keeps the base layer's state-dict names: ``layers.0.attention.wq.weight`` (or a
quantized base's ``.qweight``/``.scales``/``.zeros``) stays as the checkpoint has it, so a checkpoint's tensors load
into a wrapped model unchanged, and the adapter's own tensors sit beside them as ``layers.0.attention.wq.lora_A``
and ``layers.0.attention.wq.lora_B``. (The base module is the wrapper's child ``base``; ``named_parameters`` shows
``...wq.base.weight``, and ``_fqn_modifiers`` tells torch.distributed.checkpoint how state-dict names map to it.)

The adapter file is a safetensors file holding those ``lora_A``/``lora_B`` tensors and, under their model names,
any tensor trained in full beside them (``extra``: a reward model's scalar head ``score.weight``). Its header:

``format``              ``llamactl-adapter/1``
``lora``                ``{"rank", "alpha", "dropout", "targets"}``
``base_sha256``         the base checkpoint's identity (``model_sha256``: its files' sha256, comma-joined)
``base_source_sha256``  when the base was quantized: the floating-point model it was made from (optional)
``base_config``         the base's ModelArgs
``extra``               JSON list of the extra tensors' names
``role``                what the adapted scalar-head model is for (helpfulness, safety, value; optional)
``lineage``             who made it (as a checkpoint's lineage)

An adapter applies to its base, to a quantization of its base, and (QLoRA) when trained on a quantized base to the
floating-point model that base was made from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from llamactl.checkpoint import ADAPTER_FORMAT as FORMAT
from llamactl.checkpoint import FORMAT as MODEL_FORMAT
from llamactl.checkpoint import (
    ROLES,
    CheckpointMeta,
    lineage_problem,
    model_sha256,
    plan_from_tensors,
    read_safetensors,
    safetensors_metadata,
    write_safetensors,
)
from llamactl.config import model_args
from llamactl.errors import UserError
from llamactl.files import require_input
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import swap_linears

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the block linears (model.py names)
_OWNER = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}
_OWNER |= {"w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get adapters, and their shape: ``scale * B A x`` added, A (rank, in), B (out, rank)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def problems(self) -> list[str]:
        out = []
        if type(self.rank) is not int or self.rank < 1:
            out.append(f"rank {self.rank!r} is not a positive integer")
        if type(self.alpha) not in (int, float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            out.append(f"alpha {self.alpha!r} is not a positive number")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            out.append(f"dropout {self.dropout!r} is not in [0, 1)")
        if not isinstance(self.targets, tuple) or not self.targets:
            out.append(f"targets {self.targets!r} is not a non-empty list")
        elif bad := [t for t in self.targets if t not in TARGETS]:
            out.append(f"target {bad[0]!r} is not one of {', '.join(TARGETS)}")
        elif len(set(self.targets)) != len(self.targets):
            out.append(f"targets {list(self.targets)} name a layer twice")
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": list(self.targets)})

    @classmethod
    def from_json(cls, text: str, source: str) -> LoraSpec:
        try:
            doc = json.loads(text)
            spec = cls(**{**doc, "targets": tuple(doc["targets"])})
        except KeyError as e:
            raise UserError(f"{source}: damaged adapter header (lora: no {e.args[0]!r})") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{source}: damaged adapter header (lora: {str(e)[:160]})") from None
        if problems := spec.problems():
            raise UserError(f"{source}: damaged adapter header (lora: {'; '.join(problems)})")
        return spec

    def describe(self) -> str:
        return (f"rank {self.rank}, alpha {self.alpha:g} (scale {self.scale:g}), dropout {self.dropout:g}, "
                f"targets {','.join(self.targets)}")  # fmt: skip


def parse_targets(text: str) -> tuple[str, ...]:
    """``all`` or a comma list of block layers (``wq,wv``), in model order; a bad name is a UserError."""
    if text.strip() == "all":
        return TARGETS
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        got = f"{bad[0]!r} is not" if bad else "an empty list names none of"
        raise UserError(f"--lora-targets: {got} the block layers {', '.join(TARGETS)} (or all)")
    return tuple(t for t in TARGETS if t in names)


def adapter_names(args: ModelArgs, spec: LoraSpec) -> list[str]:
    """The layers that get adapters, as model names (``layers.0.attention.wq``), in model order."""
    return [f"layers.{i}.{_OWNER[t]}.{t}" for i in range(args.n_layers) for t in TARGETS if t in spec.targets]


# ------------------------------------------------------------------------------------------------ the layer


class LoRALinear(nn.Module):
    """``y = base(x) + scale * B(A(dropout(x)))`` over a frozen base linear (``nn.Linear`` or ``QuantLinear``, whose
    forward passes gradients to x); ``enabled = False`` gives ``base(x)`` alone. A and B are fp32, made on the base's
    device (they stay meta on a meta model, for whoever materialises it: ``reset_parameters`` then inits them)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, scale
        device = next(iter(base.state_dict().values())).device  # a weight, or a quantized layer's levels
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        self.reset_parameters()
        self.register_state_dict_post_hook(_base_names_out)

    def reset_parameters(self) -> None:
        """A as PEFT's default (and ``nn.Linear``'s): Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
        1/sqrt(in)); B zeros. A no-op on the meta device."""
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, enabled={self.enabled}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the base's tensors come under the wrapper's own names (``wq.weight``): give them to the child ``base``
        for key in self.base.state_dict():
            if prefix + key in state_dict:
                state_dict[f"{prefix}base.{key}"] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fqn_modifiers(self) -> dict[str, str]:
        """For torch.distributed.checkpoint: the state-dict names that live in the child ``base``."""
        return dict.fromkeys(self.base.state_dict(), "base")


def _base_names_out(module: LoRALinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: ``wq.base.weight`` -> ``wq.weight`` (the checkpoint's name), the base's tensors first, in
    place."""
    inner = prefix + "base."
    items = dict(state_dict)
    ours = [k for k in items if k.startswith(prefix)]  # this wrapper's, saved together
    first = ours[0] if ours else None
    ours.sort(key=lambda k: not k.startswith(inner))
    state_dict.clear()
    for k, v in items.items():
        if k == first:
            state_dict.update((prefix + o[len(inner) :] if o.startswith(inner) else o, items[o]) for o in ours)
        elif not k.startswith(prefix):
            state_dict[k] = v


def add_lora(model: Transformer, spec: LoraSpec) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the ``spec.targets`` of every block in a ``LoRALinear`` (the
    adapters trainable, fp32, on each base's device); returns the names wrapped, in model order."""
    assert not spec.problems(), spec.problems()
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(adapter_names(model.args, spec))
    assert all(b.attention.wqkv is None and b.feed_forward.w13 is None for b in model.layers), "an unfused model"
    return swap_linears(
        model, lambda name, m: LoRALinear(m, spec.rank, spec.scale, spec.dropout) if name in wanted else None
    )


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a wrapped model by its state-dict name (``layers.0.attention.wq.lora_A``), detached."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every ``LoRALinear`` of ``model`` gives its base's output alone (the reference policy of PPO)."""
    mods = [m for _, m in lora_modules(model)]
    was = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, was, strict=True):
            m.enabled = e


# ------------------------------------------------------------------------------------------------- the file


@dataclass
class AdapterMeta:
    """What an adapter file says about itself besides its tensors."""

    spec: LoraSpec
    base_sha256: str  # model_sha256 of the checkpoint it was trained on
    base_args: ModelArgs
    extra: tuple[str, ...] = ()  # tensors trained in full, stored under their model names (a scalar head)
    lineage: dict = field(default_factory=dict)
    role: str | None = None  # the adapted scalar-head model's job (helpfulness, safety, value)
    base_source_sha256: str = ""  # a quantized base's source (its QuantSpec.source_sha256)
    path: str = field(default="", compare=False)  # the file it was read from (for messages), not stored

    @classmethod
    def of_base(
        cls, spec: LoraSpec, base_path: str, base_meta: CheckpointMeta, extra=(), lineage=None, role=None
    ) -> AdapterMeta:
        """The header of an adapter trained on the checkpoint at ``base_path``."""
        source = base_meta.quant.source_sha256 if base_meta.quant is not None else ""
        return cls(spec, model_sha256(base_path), base_meta.args, tuple(extra), lineage or {}, role, source)

    @property
    def args(self) -> ModelArgs:
        """The adapted model's config: the base's, with a scalar head where the adapter brings one."""
        if "score.weight" in self.extra and self.base_args.head == "lm":
            return replace(self.base_args, head="scalar", tie_embeddings=False)
        return self.base_args

    def adapted(self, base: CheckpointMeta, merged: bool) -> CheckpointMeta:
        """The header of the model this adapter makes of ``base``: the adapted config, the role the adapter gives
        (else the base's), the base's tokenizer, the adapter's lineage (else the base's); quantized as the base
        unless ``merged`` (a merge dequantizes)."""
        role = self.role if self.args.head == "scalar" and self.role else base.role
        quant = None if merged else base.quant
        return CheckpointMeta(self.args, base.tokenizer, self.lineage or base.lineage, role, quant)

    def describe_model(self) -> str:
        if self.args.head == "lm":
            return "a language model"
        return f"a {self.role or 'scalar-head'} {'model' if self.role == 'value' else 'reward model'} (scalar head)"

    def to_header(self) -> dict[str, str]:
        header = {
            "format": FORMAT,
            "lora": self.spec.to_json(),
            "base_sha256": self.base_sha256,
            "base_config": json.dumps(self.base_args.to_dict()),
            "extra": json.dumps(list(self.extra)),
            "lineage": json.dumps(self.lineage),
        }
        if self.base_source_sha256:
            header["base_source_sha256"] = self.base_source_sha256
        if self.role is not None:
            header["role"] = self.role
        return header

    @classmethod
    def from_header(cls, header: dict[str, str], source: str) -> AdapterMeta:
        fmt = header.get("format")
        if fmt != FORMAT:
            if fmt == MODEL_FORMAT:
                raise UserError(f"{source}: is a model checkpoint, not a LoRA adapter (an adapter is what training "
                                "with --lora-rank writes)")  # fmt: skip
            raise UserError(f"{source}: not a LoRA adapter (no '{FORMAT}' format tag in its header)")
        try:
            spec = LoraSpec.from_json(header["lora"], source)
            base_sha, config = header["base_sha256"], json.loads(header["base_config"])
            extra, lineage = json.loads(header.get("extra", "[]")), json.loads(header.get("lineage", "{}"))
        except KeyError as e:
            raise UserError(f"{source}: damaged adapter header (no {e.args[0]!r})") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{source}: damaged adapter header ({str(e)[:160]})") from None
        if not base_sha:
            raise UserError(f"{source}: damaged adapter header (base_sha256 is empty)")
        if not isinstance(extra, list) or not all(isinstance(e, str) for e in extra):
            raise UserError(f"{source}: damaged adapter header (extra is not a list of tensor names)")
        if problem := lineage_problem(lineage):
            raise UserError(f"{source}: damaged lineage in the adapter header ({problem})")
        meta = cls(spec, base_sha, model_args(config, f"{source}: header base_config"), tuple(extra), lineage,
                   header.get("role"), header.get("base_source_sha256", ""), source)  # fmt: skip
        if meta.role is not None and (meta.role not in ROLES or meta.args.head != "scalar"):
            raise UserError(f"{source}: damaged adapter header (role {meta.role!r} for a {meta.args.head!r} head)")
        return meta


def expected_tensors(meta: AdapterMeta) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an adapter with this header holds: lora_A/lora_B per target, then extras."""
    with torch.device("meta"):
        model = Transformer(meta.args)
    shapes = {}
    for name in adapter_names(meta.args, meta.spec):
        out, inp = model.get_submodule(name).weight.shape
        shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (meta.spec.rank, inp), (out, meta.spec.rank)
    state = model.state_dict()
    for name in meta.extra:
        shapes[name] = tuple(state[name].shape) if name in state else None
    return shapes


def tensor_problems(meta: AdapterMeta, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What does not fit the header among an adapter's tensors (each problem naming its tensor)."""
    shapes = expected_tensors(meta)
    targeted = {f"{n}.weight" for n in adapter_names(meta.args, meta.spec)}
    problems = [f"extra tensor {n!r} is not a tensor of the model" for n in meta.extra if shapes[n] is None]
    problems += [f"extra tensor {n!r} is a layer the adapter adapts" for n in meta.extra if n in targeted]
    for name, t in tensors.items():
        if name not in shapes:
            layer = name.split(".")[1] if name.startswith("layers.") else ""
            if layer.isdigit() and int(layer) >= meta.args.n_layers:
                n = meta.args.n_layers
                problems.append(f"tensor {name!r} names a layer the base does not have (it has {n} "
                                f"layer{'s' if n != 1 else ''})")  # fmt: skip
            else:
                problems.append(f"unexpected tensor {name!r} (targets {','.join(meta.spec.targets)}, extra "
                                f"{', '.join(meta.extra) or 'none'})")  # fmt: skip
        elif shapes[name] is not None and tuple(t.shape) != shapes[name]:
            problems.append(f"tensor {name!r} has shape {tuple(t.shape)}, the header says {shapes[name]}")
        elif not t.is_floating_point():
            problems.append(f"tensor {name!r} is {t.dtype}, not floating point")
    problems += [f"tensor {n!r} is missing" for n in shapes if n not in tensors]
    return problems


def save_adapter(path: str, tensors: dict[str, torch.Tensor], meta: AdapterMeta) -> None:
    """Write an adapter file (atomically): ``tensors`` are ``adapter_state`` plus the extras, named as the model."""
    problems = tensor_problems(meta, tensors)
    assert not problems, f"{path}: {problems[0]}"
    order = list(expected_tensors(meta))
    write_safetensors(path, plan_from_tensors({k: tensors[k] for k in order}), meta.to_header())


def read_adapter(path: str) -> tuple[AdapterMeta, dict[str, torch.Tensor]]:
    """An adapter file's header and tensors (memory-mapped), checked against each other; any damage is one line
    naming the file."""
    require_input(path, "adapter file")
    meta = AdapterMeta.from_header(safetensors_metadata(path), path)
    tensors = read_safetensors(path)
    if problems := tensor_problems(meta, tensors):
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        raise UserError(f"{path}: {problems[0]}{more}")
    return meta, tensors


def is_adapter(path: str) -> bool:
    """Whether ``path`` is a file whose safetensors header says it is an adapter."""
    if not os.path.isfile(path):
        return False
    try:
        return safetensors_metadata(path).get("format") == FORMAT
    except UserError:
        return False


# ------------------------------------------------------------------------------------------------ with a base


def _identities(sha: str, source_sha: str) -> set[str]:
    return {s for s in (sha, source_sha) if s}


def check_base(meta: AdapterMeta, base_path: str, base_meta: CheckpointMeta) -> None:
    """Refuse (one line) a base the adapter was not trained on: it applies to the checkpoint it was trained on, to a
    quantization of it, and (trained on a quantized base) to the floating-point model that one was made from."""
    name = meta.path or "the adapter"
    if base_meta.args != meta.base_args:
        ours, theirs = base_meta.args.to_dict(), meta.base_args.to_dict()
        diff = ", ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs[k])
        raise UserError(f"{name}: was trained on a model of another config than {base_path} ({diff})")
    source = base_meta.quant.source_sha256 if base_meta.quant is not None else ""
    have = model_sha256(base_path)
    if not _identities(meta.base_sha256, meta.base_source_sha256) & _identities(have, source):
        raise UserError(f"{name}: was trained on another model than {base_path} (base sha256 "
                        f"{meta.base_sha256[:12]}, {base_path} has {have[:12]})")  # fmt: skip


def check_adapted_head(meta: AdapterMeta, base_path: str, head: str, purpose: str) -> None:
    """Refuse (one line) an adapter whose adapted model has another head than a command needs."""
    if meta.args.head != head:
        want = "a reward model (scalar head)" if head == "scalar" else "a language model"
        raise UserError(f"{meta.path or 'the adapter'}: makes {base_path} {meta.describe_model()}; {want} is "
                        f"needed {purpose}")  # fmt: skip
