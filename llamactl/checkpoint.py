"""Self-describing checkpoints: safetensors weights, with the model config, tokenizer and lineage in the header.

One ``.safetensors`` file per model; above ``shard_size`` the weights go to ``NAME-00001-of-0000N.safetensors`` files
plus ``NAME.safetensors.index.json`` (Hugging Face's index layout). Files are written tensor by tensor through a
streaming writer, so saving never needs a second copy of the weights, and loading memory-maps them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from llamactl import __version__
from llamactl.config import model_args
from llamactl.errors import UserError
from llamactl.files import atomic_path, kind_of, require_input
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import QuantSpec, undivided_dims

FORMAT = "llamactl/1"
ADAPTER_FORMAT = "llamactl-adapter/1"  # a LoRA adapter file (``llamactl.lora``), refused where a model is read
ROLES = ("helpfulness", "safety", "value")  # what a scalar-head checkpoint is for (its header's "role")
ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.bool: "BOOL",
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"--shard-size: cannot read {text!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


SHA_CACHE_ENTRIES = 1000  # files remembered by the sha256 cache (the oldest forgotten first)


def _sha_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "llamactl", "sha256.json")


def _read_sha_cache() -> dict:
    try:
        with open(_sha_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_sha256(path: str) -> str:
    """``sha256_file`` remembered by (real path, size, mtime_ns, inode) in $XDG_CACHE_HOME/llamactl/sha256.json (or
    ~/.cache/llamactl): a file that has not changed is hashed once. A cache that cannot be read or written is only
    a cache: the file is hashed."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = _read_sha_cache().get(real)
    if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(real)
    cache = _read_sha_cache()  # again: another process may have added to it meanwhile
    cache.pop(real, None)
    cache[real] = {"stat": key, "sha256": digest}
    cache = dict(list(cache.items())[-SHA_CACHE_ENTRIES:])
    target = _sha_cache_path()
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return digest


def model_sha256(path: str) -> str:
    """A checkpoint's identity: the sha256 of each of its files (one .safetensors, or its index then its shards),
    comma-joined; cached (``cached_sha256``), so a large base is hashed once, not by every command that checks it."""
    return ",".join(cached_sha256(f) for f in checkpoint_files(path))


@dataclass
class TensorPlan:
    """A tensor to write, known by shape and dtype before its data is produced (so headers can be written first)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_from_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[TensorPlan]:
    """Plans for tensors already at hand (mmapped or in memory), cast to ``dtype`` one at a time while writing."""
    plans = []
    for name, t in tensors.items():
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        plans.append(TensorPlan(name, tuple(t.shape), out_dtype, lambda t=t, d=out_dtype: t.to(d)))
    return plans


def write_safetensors(path: str, plans: list[TensorPlan], metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file (format: u64 header size, JSON header, raw little-endian data).

    Only one tensor is in memory at a time; the file appears under ``path`` only once complete.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for p in plans:
        if p.dtype not in ST_DTYPES:
            raise ValueError(f"cannot store dtype {p.dtype} in safetensors")
        header[p.name] = {
            "dtype": ST_DTYPES[p.dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for p in plans:
            t = p.produce().detach().to("cpu").contiguous()
            assert tuple(t.shape) == p.shape and t.dtype == p.dtype, f"{p.name}: planned {p.shape} {p.dtype}"
            f.write(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # no copy of the bytes
            del t


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself besides its weights."""

    args: ModelArgs
    tokenizer: bytes | None = None
    lineage: dict = field(default_factory=dict)
    role: str | None = None  # a scalar-head model's job: "helpfulness" or "safety" (reward models), "value" (ppo)
    quant: QuantSpec | None = None  # how its linear layers are quantized (``llamactl quantize``); None: not at all

    def to_header(self) -> dict[str, str]:
        meta = {"format": FORMAT, "config": json.dumps(self.args.to_dict()), "lineage": json.dumps(self.lineage)}
        if self.tokenizer is not None:
            meta["tokenizer"] = base64.b64encode(self.tokenizer).decode()
        if self.role is not None:
            meta["role"] = self.role
        if self.quant is not None:
            meta["quantization"] = self.quant.to_json()
        return meta

    @classmethod
    def from_header(cls, meta: dict[str, str], source: str) -> CheckpointMeta:
        if meta.get("format") == ADAPTER_FORMAT:
            raise UserError(f"{source}: is a LoRA adapter, not a model; give it with --adapter beside the model it was "
                            f"trained on (or merge it: llamactl convert BASE --merge-adapter {source})")  # fmt: skip
        if meta.get("format") != FORMAT:
            raise UserError(f"{source}: not a llamactl checkpoint (no '{FORMAT}' format tag in its header)")
        try:
            config = json.loads(meta["config"])
            tok = base64.b64decode(meta["tokenizer"], validate=True) if "tokenizer" in meta else None
            lineage = json.loads(meta.get("lineage", "{}"))
        except KeyError as e:
            raise UserError(f"{source}: damaged checkpoint header (no {e.args[0]!r})") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{source}: damaged checkpoint header ({str(e)[:160]})") from None
        problem = lineage_problem(lineage)
        if problem:
            raise UserError(f"{source}: damaged lineage in the checkpoint header ({problem})")
        args = model_args(config, f"{source}: header")
        role = meta.get("role")
        if role is not None and (role not in ROLES or args.head != "scalar"):
            raise UserError(f"{source}: damaged checkpoint header (role {role!r} for a {args.head!r} head)")
        quant = QuantSpec.from_json(meta["quantization"], source) if "quantization" in meta else None
        if quant is not None and (bad := undivided_dims(args, quant.group_size)):
            raise UserError(f"{source}: damaged checkpoint header (quantization: group size {quant.group_size} does "
                            f"not divide {', '.join(bad)})")  # fmt: skip
        return cls(args, tok, lineage, role, quant)


def lineage_problem(lineage: object) -> str | None:
    """What is wrong with a lineage read from a file (None if nothing): each level an object with text
    ``command``/``llamactl``, a list ``args``, an integer ``step``, ``inputs`` of {path, sha256}, an optional
    ``parent``."""
    where = "lineage"
    while lineage is not None:
        if not isinstance(lineage, dict):
            return f"{where} is {type(lineage).__name__}, not an object"
        for key, kind in (("command", str), ("llamactl", str), ("step", int), ("args", list), ("inputs", list)):
            if key in lineage and not isinstance(lineage[key], kind):
                return f"{where}.{key} is {type(lineage[key]).__name__}, not {kind.__name__}"
        for i, item in enumerate(lineage.get("inputs", [])):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("path", "sha256")):
                return f"{where}.inputs[{i}] is not an object with text fields 'path' and 'sha256'"
        lineage, where = lineage.get("parent"), f"{where}.parent"
    return None


def make_lineage(command: str, argv: list[str], inputs: Iterable[str], parent: dict | None = None, **extra) -> dict:
    """Who made a checkpoint: command, arguments, inputs with their sha256, version, and the parent's lineage."""
    lineage = {
        "command": command,
        "args": list(argv),
        "inputs": [{"path": p, "sha256": sha256_file(p)} for p in inputs if os.path.isfile(p)],
        "llamactl": __version__,
        **extra,
    }
    if parent:
        lineage["parent"] = parent
    return lineage


def index_path(path: str) -> str:
    return path + ".index.json" if path.endswith(".safetensors") else path


def group_plans(plans: list[TensorPlan], shard_size: int) -> list[list[TensorPlan]]:
    """Consecutive groups of at most ``shard_size`` bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if groups[-1] and size + p.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    return groups


def save_plans(path: str, plans: list[TensorPlan], meta: CheckpointMeta, shard_size: int | None = None) -> list[str]:
    """Write a checkpoint from tensor plans: one file, or shards plus an index above ``shard_size``. Returns paths.

    Shard names carry a token of this save, so a new save never overwrites a shard an existing index points at;
    the files of the checkpoint that was at ``path`` before are removed only once the new one is complete.
    """
    if not path.endswith(".safetensors"):
        raise UserError(f"{path}: a llamactl checkpoint is a .safetensors file")
    previous = _previous_files(path)
    header = meta.to_header()
    total = sum(p.nbytes for p in plans)
    if shard_size is None or total <= shard_size:
        write_safetensors(path, plans, header)
        written = [path]
    else:
        groups = group_plans(plans, shard_size)
        stem, token = path[: -len(".safetensors")], secrets.token_hex(4)
        names = [f"{stem}-{token}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map = {}
        for name, group in zip(names, groups, strict=True):
            write_safetensors(name, group, {"format": FORMAT, "shard_of": os.path.basename(path)})
            weight_map.update({p.name: os.path.basename(name) for p in group})
        index = {"metadata": {**header, "total_size": str(total)}, "weight_map": weight_map}
        with atomic_path(index_path(path)) as tmp, open(tmp, "w") as f:  # the index last: it names whole shards
            json.dump(index, f, indent=1)
        written = names + [index_path(path)]
    for old in previous - set(written):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    return written


def _previous_files(path: str) -> set[str]:
    """Files of the checkpoint now at ``path`` (either layout), to remove after a new save there."""
    files = {path} if os.path.isfile(path) else set()
    if os.path.isfile(index_path(path)):
        files.add(index_path(path))
        with contextlib.suppress(UserError):
            base = os.path.dirname(index_path(path))
            files.update(os.path.join(base, s) for s in _read_index(index_path(path))["weight_map"].values())
    return files


def checkpoint_files(path: str) -> list[str]:
    """The files a checkpoint consists of: one .safetensors, or its index followed by its shards."""
    file, is_index = _resolve(path)
    if not is_index:
        return [file]
    base = os.path.dirname(file)
    return [file] + [os.path.join(base, s) for s in dict.fromkeys(_read_index(file)["weight_map"].values())]


def save_model(
    path: str,
    model: Transformer,
    tokenizer: bytes | None = None,
    lineage: dict | None = None,
    dtype: torch.dtype | None = None,
    shard_size: int | None = None,
) -> list[str]:
    state = {k: v for k, v in model.state_dict().items()}
    return save_plans(
        path, plan_from_tensors(state, dtype), CheckpointMeta(model.args, tokenizer, lineage or {}), shard_size
    )


def _resolve(path: str) -> tuple[str, bool]:
    """(file to open, is_index) for a checkpoint path: a .safetensors file, its index, or a name with an index.

    Where both layouts exist (a save of the other layout was interrupted before it removed the old files), the
    newer one is the checkpoint.
    """
    if path.endswith(".json"):
        require_input(path, "checkpoint index")
        return path, True
    single, index = os.path.isfile(path), os.path.isfile(index_path(path))
    if single and index:
        single = os.path.getmtime(path) >= os.path.getmtime(index_path(path))
    if single:
        return path, False
    if index:
        return index_path(path), True
    kind = kind_of(path)
    if kind is None:
        raise UserError(f"{path}: no such checkpoint")
    hint = ""
    if kind == "a directory" and any(os.path.isfile(os.path.join(path, f)) for f in ("params.json", "config.json")):
        hint = f"; convert it first: llamactl convert {path} -o model.safetensors"
    raise UserError(f"{path}: is {kind}, not a checkpoint (a .safetensors file or its .index.json){hint}")


def _open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of one safetensors file's header (empty if none); damage is a one-line UserError."""
    with _open_safetensors(path) as f:
        return f.metadata() or {}


def read_meta(path: str) -> CheckpointMeta:
    """Config, tokenizer and lineage of a checkpoint without touching its weights."""
    file, is_index = _resolve(path)
    if is_index:
        return CheckpointMeta.from_header(_read_index(file)["metadata"], file)
    return CheckpointMeta.from_header(safetensors_metadata(file), file)


def _read_index(file: str) -> dict:
    try:
        with open(file) as f:
            index = json.load(f)
        assert isinstance(index["metadata"], dict) and isinstance(index["weight_map"], dict)
        return index
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{file}: not a checkpoint index (JSON with 'metadata' and 'weight_map')") from None


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (one file or shards), memory-mapped: no copy is made until a tensor is used."""
    files = checkpoint_files(path)
    if files[0].endswith(".json"):  # an index, followed by its shards
        index, files = files[0], files[1:]
        for s in files:
            if not os.path.isfile(s):
                raise UserError(f"{index}: shard {s} is missing")
    tensors = {}
    for s in files:
        tensors.update(read_safetensors(s))
    return tensors


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (any producer's), memory-mapped; damage is a one-line UserError."""
    tensors = {}
    with _open_safetensors(path) as f:
        for k in f.keys():
            try:
                tensors[k] = f.get_tensor(k)
            except Exception as e:  # safetensors raises its own types for truncated data
                raise UserError(f"{path}: tensor {k!r} cannot be read ({str(e).splitlines()[0][:120]})") from None
    return tensors


def check_state(source: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Names and shapes of ``got`` must match the model's ``expected`` exactly, and integer (quantized) tensors
    their dtype; else one line naming the key."""
    missing = [k for k in expected if k not in got]
    if missing:
        raise UserError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = [k for k in got if k not in expected]
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
    for k, t in expected.items():
        if tuple(got[k].shape) != tuple(t.shape):
            raise UserError(f"{source}: tensor {k!r} has shape {tuple(got[k].shape)}, the config says {tuple(t.shape)}")
        floating = t.is_floating_point()
        if floating != got[k].is_floating_point() or (not floating and got[k].dtype != t.dtype):
            raise UserError(f"{source}: tensor {k!r} is {got[k].dtype}, the format says {t.dtype}")


def is_scale(name: str) -> bool:
    return name.endswith(".scales")


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype most of a checkpoint's tensors have (quantization scales aside)."""
    floats = [t.dtype for k, t in tensors.items() if t.is_floating_point() and not is_scale(k)]
    return max(set(floats), key=floats.count) if floats else torch.float32
