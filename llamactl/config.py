"""Model configs from values a user or a file gave, checked before anything is computed or allocated from them.

Every place that builds a ``ModelArgs`` from outside values goes through ``model_args``: ``--set`` flags, checkpoint
headers, and the converters' ``params.json``, ``config.json`` and llama2.c headers. Each field is checked against
its declared type (a bool is ``true``/``false``, not the string "False"; an int is not 64.0) and allowed values,
then ``ModelArgs`` checks sizes and their relations. ``check_memory`` refuses an allocation larger than the device
before it is tried (a header asking for ``max_seq_len`` 2^34 is refused, not attempted).
"""

from __future__ import annotations

import dataclasses
import math
import os

from llamactl.errors import UserError
from llamactl.model import HEADS, ModelArgs

CHOICES = {"head": HEADS}


def field_types() -> dict[str, tuple[str, ...]]:
    """Each ModelArgs field with the type names its annotation allows ("int", "float", "bool", "str", "None")."""
    names = {}
    for f in dataclasses.fields(ModelArgs):
        text = f.type if isinstance(f.type, str) else str(f.type).replace("<class '", "").replace("'>", "")
        names[f.name] = tuple(t.strip().replace("NoneType", "None") for t in text.split("|"))
    return names


def value_problem(key: str, value: object, shown: str | None = None) -> str | None:
    """Why ``value`` cannot be the ModelArgs field ``key`` (called ``shown`` where it came from), or None."""
    types = field_types().get(key)
    if types is None:
        return f"{key} is not a model config field (fields: {', '.join(field_types())})"
    key = shown or key
    if value is None:
        return None if "None" in types else f"{key} must be set, got null"
    ok = (
        ("bool" in types and type(value) is bool)
        or ("int" in types and type(value) is int)
        or ("float" in types and type(value) in (int, float) and math.isfinite(value))
        or ("str" in types and type(value) is str and value in CHOICES.get(key, (value,)))
    )
    if ok:
        return None
    if key in CHOICES:
        return f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}"
    want = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "text"}
    names = " or ".join(want[t] for t in types if t in want)
    return f"{key} must be {names}, got {value!r}"


def model_args(values: dict, source: str, names: dict[str, str] | None = None) -> ModelArgs:
    """A ModelArgs from outside ``values``; every problem found is named in one UserError that starts with
    ``source`` (a file, or the flag the values came from), each field by its name there (``names``: ours -> theirs,
    e.g. dim -> hidden_size)."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: a model config is a JSON object, got {type(values).__name__}")
    names = names or {}
    problems = [p for k, v in values.items() if (p := value_problem(k, v, names.get(k)))]
    if problems:
        raise UserError(f"{source}: invalid model config: {'; '.join(problems)}")
    try:
        return ModelArgs(**values)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def parse_override(text: str) -> tuple[str, object]:
    """``--set key=value``: the value read as the field's type (true/false, an integer, a number, text, none)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: write key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    types = field_types().get(key)
    if types is None:
        raise UserError(f"--set {text}: {value_problem(key, raw)}")
    value: object = raw
    if raw.lower() in ("none", "null") and "None" in types:
        value = None
    elif "bool" in types:
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    elif "int" in types:
        try:
            value = int(raw)
        except ValueError:
            if "float" in types:
                value = _float(raw)
    elif "float" in types:
        value = _float(raw)
    problem = value_problem(key, value)
    if problem:
        raise UserError(f"--set {text}: {problem}")
    return key, value


def _float(raw: str) -> object:
    try:
        return float(raw)
    except ValueError:
        return raw


def memory_limit(device) -> int:
    """Bytes the device has: a GPU's memory, or the machine's physical memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes: int, what: str, source: str, device="cpu") -> None:
    """Refuse an allocation of ``nbytes`` for ``what`` that the device cannot hold, before it is tried."""
    limit = memory_limit(device)
    if nbytes > limit:
        raise UserError(f"{source}: {what} would take {_size(nbytes)}, more than the {_size(limit)} of {device}")


def rope_bytes(args: ModelArgs) -> int:
    """The rotary tables a model builds: cos and sin, (max_seq_len, head_dim / 2) each, fp32."""
    return 2 * args.max_seq_len * (args.head_dim // 2) * 4


def kv_cache_bytes(args: ModelArgs, batch: int, length: int, dtype) -> int:
    """The keys and values ``model.KVCache`` allocates: per layer two (batch, n_kv_heads, length, head_dim)."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * batch * args.n_kv_heads * length * args.head_dim * itemsize


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n < 1e15 else f"{n:.2e} bytes"
