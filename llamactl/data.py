"""Data samplers shared by the training stages: each turns a step number into that step's batch, as a pure function,
so that a checkpoint's data position is its step and a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import torch

from llamactl.train import Task


class Windows:
    """Training sequences: windows of seq_len + 1 tokens at a stride of seq_len (a window's last token starts the
    next one), in a seeded random order per epoch.

    Sample g of the run is window perm_{g // n}[g % n]: a pure function of g, so the data position is one integer
    that a checkpoint restores exactly, and ranks read disjoint samples of the same global order.
    """

    def __init__(self, split, seq_len: int, seed: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.n = (len(split) - 1) // seq_len
        self._epoch, self._perm = -1, None

    def batch(self, first: int, count: int):
        import numpy as np
        import torch

        rows = []
        for g in range(first, first + count):
            epoch, i = divmod(g, self.n)
            if self.shuffle and epoch != self._epoch:
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                self._epoch = epoch
            w = int(self._perm[i]) if self.shuffle else i
            rows.append(self.split.tokens(w * self.seq_len, w * self.seq_len + self.seq_len + 1))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]


class WindowsTask(Task):
    """Language-model pretraining on ``Windows``: every target token counts. Micro-batch m of step s on rank r holds
    samples (s * accum * world + m * world + r) * batch_size onward, so ranks read disjoint parts of one global order
    and the order does not depend on how a step is split into micro-steps."""

    def __init__(
        self,
        windows: Windows,
        batch_size: int,
        accum: int,
        device: torch.device,
        val: Windows | None = None,
        eval_batches: int = 0,
    ):
        self.windows, self.batch_size, self.accum, self.device = windows, batch_size, accum, device
        self.val, self.eval_batches = val, eval_batches
        self.rank, self.world = 0, 1

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        self.rank, self.world = rank, world
        first = step * self.accum * world * self.batch_size + (micro * world + rank) * self.batch_size
        x, y = self.windows.batch(first, self.batch_size)
        return {"tokens": x, "targets": y}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["targets"].numel()

    def loss(self, model, batch):
        return model(batch["tokens"].to(self.device), batch["targets"].to(self.device), output="loss_sum")

    def evaluate(self, model) -> dict[str, float]:
        import math

        import torch.distributed as dist

        if self.val is None or not self.eval_batches:
            return {}
        n = min(self.eval_batches, self.val.n // self.batch_size // self.world)  # >= 1: checked before training
        total = torch.zeros(2, device=self.device)
        for b in range(n):
            x, y = self.val.batch((b * self.world + self.rank) * self.batch_size, self.batch_size)
            loss_sum, count = model(x.to(self.device), y.to(self.device), output="loss_sum")
            total += torch.stack([loss_sum.float(), count.float()])
        if self.world > 1:
            dist.all_reduce(total)
        val = float(total[0] / total[1])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
