"""Distributed set-up for training: the process group torchrun describes, FSDP2 sharding of a meta-device model,
its materialisation shard by shard from a seeded init or a memory-mapped checkpoint, DDP wrapping, gradient sync."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llamactl.model import Transformer


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1.

    Returns the group and this rank's device: under torchrun a CUDA rank always runs on ``cuda:LOCAL_RANK``, whatever
    index ``--device`` named (``--device cuda:0`` would otherwise put every rank of a node on its first GPU).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)  # before the group: NCCL binds each rank to the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), d.local_rank), device


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def shard(model: torch.nn.Module, d: Dist, device: torch.device, bf16: bool) -> None:
    """FSDP2 on a model still on the meta device: ``fully_shard`` on every transformer block, then on each
    transformer (the root, or each model of a container such as ppo's policy and value), so each rank will allocate
    only its shard of each parameter (``materialize``). With ``bf16``, FSDP2's mixed precision: parameters
    all-gathered and computed in bf16, gradients reduced in fp32, fp32 master weights in the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from llamactl.model import TransformerBlock

    mesh = init_device_mesh(device.type, (d.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    models = [m for m in model.modules() if isinstance(m, Transformer)]
    for m in model.modules():
        if isinstance(m, TransformerBlock):
            fully_shard(m, **kwargs)
    for m in models:
        fully_shard(m, **kwargs)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of a parameter: an FSDP2 shard holds rows [start, stop) of
    dim 0 (``torch.chunk``'s split: ceil(n / world) rows a rank, the last ones short or empty); a plain tensor all."""
    if not hasattr(t, "to_local"):
        return t, 0, t.shape[0] if t.dim() else 0
    local = t.to_local()
    n, world = t.shape[0], t.device_mesh.size()
    start = min(n, t.device_mesh.get_local_rank() * -(-n // world))
    assert local.shape[0] == min(-(-n // world), n - start), f"unexpected shard of {tuple(t.shape)}"
    return local, start, start + local.shape[0]


def materialize(
    model: torch.nn.Module, sources: dict[str, dict[str, torch.Tensor] | None], seed: int, device, skip=frozenset()
) -> None:
    """Allocate a meta-device (possibly sharded) model on ``device`` and fill what each rank holds: a parameter or
    buffer under prefix P gets its rows from ``sources[P]`` (a checkpoint's memory-mapped tensors: only these rows
    are read) or, where the source is None or lacks it (LoRA's adapters), from the seeded ``init_rows``. Names in
    ``skip`` are left for a checkpoint to fill. No rank ever holds a whole parameter it does not own."""
    from llamactl.model import Transformer, init_rows

    model.to_empty(device=device)
    roots = {n + "." if n else "": m for n, m in model.named_modules() if isinstance(m, Transformer)}
    with torch.no_grad():
        # by state-dict name (a LoRA wrapper's base weight is ``wq.weight`` there, as in the checkpoint)
        for name, t in model.state_dict(keep_vars=True).items():
            if name in skip:
                continue
            prefix = max((p for p in sources if name.startswith(p)), key=len)
            key, src = name[len(prefix) :], sources[prefix]
            local, start, stop = local_rows(t)
            if src is not None and key in src:
                local.copy_(src[key][start:stop] if t.dim() else src[key])
            else:
                owner = max((p for p in roots if name.startswith(p)), key=len)
                n_layers = roots[owner].args.n_layers
                local.copy_(init_rows(name[len(owner) :], tuple(t.shape), seed, n_layers, start, stop))
    for m in roots.values():
        m.reset_rope(device)


@contextlib.contextmanager
def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last. FSDP2 reduce-scatters on
    every micro-step instead, into the sharded gradients: holding its gradients unsharded until the last micro-step
    would keep a whole fp32 copy of them on every rank (+25 GiB a rank at 7B on 8 GPUs, +257 GiB at 70B), the
    memory FSDP is there to save."""
    if sync or not hasattr(wrapped, "no_sync"):
        yield
    else:
        with wrapped.no_sync():
            yield


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def build_wrapped(
    model: torch.nn.Module,
    sources: dict[str, dict[str, torch.Tensor] | None],
    seed: int,
    d: Dist,
    device: torch.device,
    distributed: str,
    bf16: bool,
    skip=frozenset(),
) -> torch.nn.Module:
    """A meta-device model sharded (FSDP2 under torchrun with ``fsdp``) before any weight exists, then materialised
    (``materialize``), then wrapped in DDP under torchrun with ``ddp``; returns the wrapped model (the model itself
    for FSDP2 and one process)."""
    fsdp = d.world > 1 and distributed == "fsdp"
    if fsdp:
        shard(model, d, device, bf16)
    materialize(model, sources, seed, device, skip)
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    return model


def sum_over_ranks(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """A scalar summed over every rank."""
    return all_reduce_sum(x.reshape(1), d)[0]


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """``x`` (on the CPU) summed over every rank, through the process group's device."""
    if d.world == 1:
        return x
    y = x.clone().to(collective_device())
    dist.all_reduce(y)
    return y.cpu()


def all_gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's rows, interleaved as the ranks' prompts are (rank r holds rows r, r + world, ...)."""
    if d.world == 1:
        return x
    parts = [torch.empty_like(x, device=collective_device()) for _ in range(d.world)]
    dist.all_gather(parts, x.to(collective_device()))
    return torch.stack([p.cpu() for p in parts], 1).reshape(-1, *x.shape[1:])


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
