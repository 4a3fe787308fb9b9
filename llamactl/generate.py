"""The generation engine: prefill, decode_one_token, sample, over a preallocated KV cache.

One engine for generate, chat, rejection-sample and ppo. Prompts of different lengths are batched right-padded:
each sequence writes its own cache slots at its own positions, so padding is never attended and never shifts
rotary positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamactl.model import KVCache, Transformer


class _PackedLinear(torch.nn.Module):
    """y = x @ W.T through oneDNN with W pre-packed into its blocked layout (inference only, no autograd)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_for_cpu_decode(model: Transformer) -> bool:
    """Swap every projection of a CPU model for a oneDNN one with a pre-packed weight; True if it did.

    NOTE: at batch 1 torch's fp32 F.linear runs a single-threaded matrix-vector product (8.2 GB/s of weights on
    this 2-core machine) while oneDNN's packed inner product uses both cores (17.4 GB/s): decode is bound by reading
    the weights, so this is most of the decode speed-up. The packed copies are extra memory (the checkpoint's own
    weights stay memory-mapped), and the model must not be trained afterwards.
    """
    weight = model.tok_embeddings.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if model.args.head == "lm":
        model.packed_head = _PackedLinear(model.output_weight)  # the output layer stays for its weight
    for layer in model.layers:
        # NOTE: one projection for q, k, v and one for w1, w3: three fewer calls per layer, ~0.5 ms of a 60M-preset
        # decode step here. The packed copies replace the modules, so the model holds each weight once more at most.
        attn, ffn = layer.attention, layer.feed_forward
        attn.wqkv = _PackedLinear(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        attn.wo = _PackedLinear(attn.wo.weight)
        ffn.w13 = _PackedLinear(torch.cat([ffn.w1.weight, ffn.w3.weight]))
        ffn.w2 = _PackedLinear(ffn.w2.weight)
        del attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3
    return True


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    logprobs: bool = False


@dataclass
class Completion:
    tokens: list[int]  # the new tokens only, the EOS included when it ended the sequence
    finish_reason: str  # "eos" or "length"
    logprobs: list[float] = field(default_factory=list)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, then top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run right-padded prompts (B, T) into the cache; logits (B, V) after each prompt's last real token."""
    h = model.hidden(tokens, cache=cache)
    last = h[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
    return model.logits(last)


@torch.inference_mode()
def decode_one_token(model: Transformer, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence (B,) at positions pos (B,); logits (B, V) for the next."""
    h = model.hidden(token[:, None], cache=cache, start=pos)
    return model.logits(h[:, 0])


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> list[Completion]:
    """Complete a batch of token prompts; stops each sequence at EOS, at max_new_tokens or at the context end."""
    assert prompts and all(prompts), "every prompt needs at least one token"
    device = model.tok_embeddings.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    max_len = min(max(len(p) for p in prompts) + params.max_new_tokens, model.args.max_seq_len)
    cache = KVCache(model.args, B, max_len, device, model.tok_embeddings.weight.dtype)
    batch = torch.zeros(B, max(len(p) for p in prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = torch.tensor(p, device=device)

    out: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    logits = prefill(model, batch, lengths, cache)
    pos = lengths.clone()
    for step in range(params.max_new_tokens):
        nxt = sample(logits, params.temperature, params.top_p, params.top_k, generator)
        lp = torch.log_softmax(logits.float(), -1).gather(1, nxt[:, None]).squeeze(1) if params.logprobs else None
        nxt_list = nxt.tolist()
        lp_list = lp.tolist() if lp is not None else None
        for i in range(B):
            if finish[i] is not None:
                continue
            out[i].append(nxt_list[i])
            if lp_list is not None:
                lps[i].append(lp_list[i])
            if eos_id is not None and nxt_list[i] == eos_id:
                finish[i] = "eos"
            elif int(pos[i]) + 1 >= max_len or step + 1 == params.max_new_tokens:
                finish[i] = "length"
        if all(f is not None for f in finish):
            break
        # finished rows keep decoding in place (their outputs are ignored) so the batch keeps its shape
        logits = decode_one_token(model, nxt, pos.clamp(max=max_len - 1), cache)
        pos += 1
    return [Completion(out[i], finish[i] or "length", lps[i]) for i in range(B)]
