"""Run checkpoints that resume exactly: ``torch.distributed.checkpoint`` folders that reshard, and the final files.

A run directory holds ``metrics.jsonl``, one ``step-NNNNNNN/`` folder per checkpoint (``dcp/``: the trained tensors and
optimizer state as safetensors shards, one set per rank and block; ``rng-R.json`` per rank; ``trainer.json``: step,
settings, the optimizer's hyperparameters and the final files' headers) and ``latest``, a one-line file naming the
newest complete checkpoint. Nothing is pickled: resuming a run directory from someone else executes no code of theirs.
A checkpoint folder is written under a temporary name and renamed when whole, and ``latest`` is replaced atomically
after it, so a crash at any moment (kill -9 or power loss) leaves the previous checkpoint as the one ``--resume``
picks up. ``llamactl convert RUN/step-N`` reads these folders too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from llamactl.checkpoint import CheckpointMeta
from llamactl.errors import UserError
from llamactl.files import atomic_path, fsync_dir
from llamactl.training.distributed import Dist, all_reduce_mean, barrier

LATEST = "latest"


TRAINER_JSON = "trainer.json"


DCP_DIR = "dcp"


TRAINER_FORMAT = "llamactl-trainer/2"


def rng_state() -> dict:
    """Every RNG of this process (Python, NumPy, torch, CUDA) as JSON."""
    import base64

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": b64(torch.get_rng_state()),
        "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import base64

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    # the devices this process sees now (a resume may see fewer than the saving one did)
    for i, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(tensor(saved), i)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        name = f.read(64).decode("utf-8", "replace").strip()
    folder = os.path.join(run_dir, name)
    if not re.fullmatch(r"step-\d{7}", name) or not os.path.isdir(folder):
        raise UserError(f"{path}: names {name!r}, which is not a checkpoint folder of this run")
    if not os.path.isfile(os.path.join(folder, TRAINER_JSON)):
        if os.path.isfile(os.path.join(folder, "trainer.pt")):
            raise UserError(
                f"{folder}: written by an older llamactl (trainer.pt, a pickle, which is not loaded: it could run "
                "code); start a new run"
            )
        raise UserError(f"{path}: names {name}, which is not a whole checkpoint (no {TRAINER_JSON})")
    return folder


def load_trainer_state(folder: str) -> dict:
    """``trainer.json`` of a checkpoint (step, config, settings, the optimizer's hyperparameters, the names of the
    trained tensors, the world that saved it); damage is one UserError naming the file."""
    path = os.path.join(folder, TRAINER_JSON)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: damaged trainer state (not JSON: {str(e)[:120]})") from None
    if isinstance(state, dict) and state.get("format") == "llamactl-trainer/1":
        raise UserError(f"{folder}: written by an older llamactl (whole-model trainer state); start a new run")
    problem = _trainer_state_problem(state)
    if problem:
        raise UserError(f"{path}: damaged trainer state ({problem})")
    # JSON has no tuples; torch's optimizers keep hyperparameters such as betas as tuples
    state["param_groups"] = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                             for g in state["param_groups"]]  # fmt: skip
    return state


def optimizer_state_problem(model: torch.nn.Module, optim: torch.optim.Optimizer, groups: list[dict]) -> str | None:
    """Whether a checkpoint's optimizer parameter groups are this optimizer's: loading other ones would not fail,
    it would silently restart the moments of the parameters it does not name."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    want = [sorted(name_of[id(p)] for p in g["params"]) for g in optim.param_groups]
    got = [sorted(map(str, g["params"])) for g in groups]
    if want != got:
        return "its optimizer's parameter groups are not this model's"
    return None


def _trainer_state_problem(state: object) -> str | None:
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        return f"no format tag {TRAINER_FORMAT!r}"
    kinds = {"step": int, "model_args": dict, "settings": dict, "param_groups": list, "trained": list, "world": int}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is missing or not {kind.__name__}"
    if state["step"] < 0 or state["world"] < 1:
        return f"step {state['step']}, world {state['world']}"
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"]):
        return "'param_groups' are not objects with 'params'"
    if not all(isinstance(n, str) for n in state["trained"]):
        return "'trained' is not a list of tensor names"
    parts = state.get("parts", {})
    if not isinstance(parts, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], dict) for v in parts.values()
    ):
        return "'parts' is not an object of [prefix, header] by file name"
    return None


Parts = dict[str, tuple[str, object]]  # file name -> (state-dict prefix, what the file says of itself)


def checkpoint_parts(meta) -> Parts:
    """The files a run writes at its end: ``model.safetensors`` for one model (a ``CheckpointMeta``), an adapter
    (a ``lora.AdapterMeta``: ``adapter.safetensors``), or one file per part of a model made of several (ppo: the
    policy, its value model)."""
    if isinstance(meta, dict):
        return meta
    return {"model.safetensors" if isinstance(meta, CheckpointMeta) else "adapter.safetensors": ("", meta)}


def trained_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of what training changes, sharded as the model is: the trainable parameters
    (a LoRA run's adapters and head, not its frozen base) and their AdamW moments. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    trained = {n for n, p in _unwrapped(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trained}, osd


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") else model  # DDP keeps the model in .module


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    trainer_state: dict,
    d: Dist,
    keep: int,
) -> str:
    """Write ``step-NNNNNNN/`` and point ``latest`` at it: every rank writes its own shards in parallel through
    ``torch.distributed.checkpoint`` (safetensors files, ``dcp/``) and its RNGs (``rng-R.json``); rank 0 then
    writes ``trainer.json``, renames the folder into place and replaces ``latest``. A kill at any point leaves the
    previous checkpoint as ``latest``."""
    import torch.distributed.checkpoint as dcp

    name = f"step-{step:07d}"
    final = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".{name}.tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    msd, osd = trained_state(model, optim)
    # one file per block on each rank: DCP's safetensors writer builds each file in memory before writing it, so a
    # save holds one block's shard at a time, not the rank's whole shard (70B on 8 ranks: 105 GB)
    keys = [f"model.{k}" for k in msd] + [f"optim.{p}.{k}" for p, per in osd["state"].items() for k in per]
    files = {k: int(m.group(1)) + 2 if (m := re.search(r"\.layers\.(\d+)\.", k)) else 1 for k in keys}
    writer = dcp.HuggingFaceStorageWriter(os.path.join(tmp, DCP_DIR), fqn_to_index_mapping=files,
                                          save_distributed=True)  # fmt: skip
    with single_process_dcp(d):
        dcp.save({"model": msd, "optim": osd["state"]}, storage_writer=writer, no_dist=d.world == 1)
    with atomic_path(os.path.join(tmp, f"rng-{d.rank}.json")) as t, open(t, "w") as f:
        json.dump(rng_state(), f)
    fault_point("checkpoint-written", step)
    barrier(d)
    if d.main:
        doc = {"format": TRAINER_FORMAT, **trainer_state, "step": step, "world": d.world,
               "param_groups": osd["param_groups"], "trained": sorted(msd)}  # fmt: skip
        with atomic_path(os.path.join(tmp, TRAINER_JSON)) as t, open(t, "w") as f:
            json.dump(doc, f)
        fsync_dir(os.path.join(tmp, DCP_DIR))
        fsync_dir(tmp)  # each file is on disk already (DCP and atomic_path fsync); now the folder's entries
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        with atomic_path(os.path.join(run_dir, LATEST)) as t, open(t, "w") as f:
            f.write(name + "\n")
        steps = sorted(n for n in os.listdir(run_dir) if n.startswith("step-") and n != name)
        for old in steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    barrier(d)
    return final


@contextlib.contextmanager
def single_process_dcp(d: Dist):
    """DCP without its notes on stderr: its warning, in one process, that no process group exists (that is the
    intent), and its logged tracebacks for a damaged checkpoint (the caller says what is wrong in one line)."""
    import logging
    import warnings

    log = logging.getLogger()  # DCP's modules log to the root logger
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if d.world == 1:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            yield
    finally:
        log.setLevel(level)


def load_checkpoint(folder: str, state: dict, model: torch.nn.Module, optim: torch.optim.Optimizer, d: Dist,
                    say) -> None:  # fmt: skip
    """Load a checkpoint saved by any number of ranks into this run's (sharded or replicated) model and optimizer:
    DCP reads, on each rank, only the parts of the saved shards that overlap its own. Each rank takes the RNGs of
    the rank of its number if the saving run had one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    problem = optimizer_state_problem(_unwrapped(model), optim, state["param_groups"])
    msd, osd = trained_state(model, optim)  # initialises the optimizer's moments, which the load overwrites
    if not problem and sorted(msd) != sorted(state["trained"]):
        problem = "it trained other tensors than this run trains"
    if problem:
        raise UserError(f"{folder}: the trainer state does not fit this run ({problem})")
    try:
        loaded = {"model": msd, "optim": osd["state"]}
        reader = dcp.HuggingFaceStorageReader(os.path.join(folder, DCP_DIR))
        with single_process_dcp(d):
            dcp.load(loaded, storage_reader=reader, no_dist=d.world == 1)
        # not strict: a LoRA run's frozen base is not in its checkpoints (the names were matched above)
        set_state_dict(model, optim, model_state_dict=loaded["model"], options=StateDictOptions(strict=False),
                       optim_state_dict={"state": loaded["optim"], "param_groups": state["param_groups"]})  # fmt: skip
    except (Exception, CheckpointException) as e:  # DCP's own exception for a damaged shard is a BaseException
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].rpartition("read failed: ")[2][:160]
        raise UserError(f"{folder}: the trainer state cannot be loaded ({reason})") from None
    rng = os.path.join(folder, f"rng-{d.rank}.json")
    problem = None
    if os.path.isfile(rng):
        try:
            with open(rng) as f:
                set_rng_state(json.load(f))
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
            problem = f"{rng}: damaged RNG state ({str(e)[:120]})"
    # every rank learns whether one failed: a rank raising alone would leave the others waiting in a collective
    device = next(iter(model.parameters())).device
    failed = all_reduce_mean(torch.tensor(float(problem is not None), device=device), d)
    if float(failed) > 0:
        raise UserError(problem or f"{folder}: another rank's RNG state is damaged (rng-R.json)")
    if d.world > state["world"]:
        say(f"{folder} was saved by {state['world']} processes: ranks {state['world']} to {d.world - 1} start from "
            "seeded RNGs")  # fmt: skip


def part_headers(meta) -> dict:
    """What a run's trainer state keeps of its final files (``checkpoint_parts``): file -> [state-dict prefix, the
    file's header], so any checkpoint folder can be exported on its own (``export_parts``, ``convert``)."""
    return {file: [prefix, m.to_header()] for file, (prefix, m) in checkpoint_parts(meta).items()}


def saved_parts(folder: str) -> Parts:
    """The parts a checkpoint folder's ``trainer.json`` names, with what each file says of itself."""
    from llamactl.checkpoint import ADAPTER_FORMAT
    from llamactl.lora import AdapterMeta

    state = load_trainer_state(folder)
    parts = {}
    for file, (prefix, header) in state.get("parts", {}).items():
        source = os.path.join(folder, TRAINER_JSON)
        is_adapter = header.get("format") == ADAPTER_FORMAT
        meta = AdapterMeta.from_header(header, source) if is_adapter else CheckpointMeta.from_header(header, source)
        meta.lineage = {**meta.lineage, "step": state["step"]}
        parts[file] = (prefix, meta)
    return parts


def part_plans(folder: str, prefix: str) -> list:
    """Plans (``checkpoint.TensorPlan``) for the tensors a checkpoint folder saved under ``prefix``, each produced
    by reading that one tensor out of every rank's shards: a whole model never sits in memory."""
    import torch.distributed.checkpoint as dcp

    from llamactl.checkpoint import TensorPlan

    class Reader(dcp.HuggingFaceStorageReader):
        """Reads every shard file's header once, not once per tensor (7B on 8 ranks: 272 files)."""

        def read_metadata(self):
            if not hasattr(self, "metadata"):
                self.metadata = super().read_metadata()
            return self.metadata

    root = os.path.join(folder, DCP_DIR)
    reader = Reader(root)
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:  # a damaged shard file (safetensors' own error)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        raise UserError(f"{root}: not a readable checkpoint ({reason})") from None

    def one(key: str) -> torch.Tensor:
        out = {key: torch.empty(saved[key].size, dtype=saved[key].properties.dtype)}
        with single_process_dcp(Dist()):
            dcp.load(out, storage_reader=reader, no_dist=True)
        return out[key]

    head = "model." + prefix
    return [TensorPlan(k[len(head) :], tuple(saved[k].size), saved[k].properties.dtype, lambda k=k: one(k))
            for k in saved if k.startswith(head)]  # fmt: skip


def export_parts(folder: str, out_dir: str) -> list[str]:
    """A checkpoint folder's files (model.safetensors, or adapters) written to ``out_dir``; returns the paths."""
    written = []
    for file, (prefix, meta) in saved_parts(folder).items():
        written.append(os.path.join(out_dir, file))
        write_part(folder, prefix, meta, written[-1])
    return written


def write_part(folder: str, prefix: str, meta, path: str) -> None:
    """One part of a checkpoint folder at ``path``: a model streamed one tensor at a time out of the saved shards
    (never a whole-model gather), or an adapter (a few MB, read whole)."""
    from llamactl.checkpoint import save_plans

    if isinstance(meta, CheckpointMeta):
        save_plans(path, part_plans(folder, prefix), meta)
    else:
        from llamactl import lora

        lora.save_adapter(path, {p.name: p.produce() for p in part_plans(folder, prefix)}, meta)


def clean_partial(run_dir: str) -> None:
    """Remove checkpoint folders a crash left half-written."""
    for n in os.listdir(run_dir):
        if n.startswith(".step-") and n.endswith(".tmp"):
            shutil.rmtree(os.path.join(run_dir, n), ignore_errors=True)


def fault_point(name: str, step: int) -> None:
    """Die by SIGKILL here when LLAMACTL_FAULT is ``name@step``: how tests kill a run at an exact point."""
    if os.environ.get("LLAMACTL_FAULT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
