"""Helpers for the LoRA tests (imported as `lora_helpers`; pytest puts tests/ on sys.path)."""

import torch


def random_adapter(base: str, path: str, spec, seed: int, head: bool = False, role: str | None = None, scale=0.3,
                   extra: tuple[str, ...] = ()):  # fmt: skip
    """An adapter file at ``path`` for the checkpoint at ``base``, with random non-zero A and B (a trained adapter's
    B is not zero), with ``head`` a random scalar head trained beside them (a reward model from a language model),
    and random ``extra`` tensors trained in full; returns (AdapterMeta, tensors)."""
    from llamactl.checkpoint import read_meta
    from llamactl.lora import AdapterMeta, expected_tensors, save_adapter

    meta = AdapterMeta.of_base(spec, base, read_meta(base), extra=("score.weight",) * head + extra, role=role)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=g) * scale for name, shape in expected_tensors(meta).items()}
    save_adapter(path, tensors, meta)
    return meta, tensors
