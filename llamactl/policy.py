"""The policy: a chat model loaded with its tokenizer and sampling settings (``Chatter``) and the dialog turns it
answers through the generation engine. ``chat``, ``rejection-sample``, ``compare`` and ``gatt-augment`` sample
through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.errors import UserError


@dataclass
class Chatter:
    """A loaded chat model with its tokenizer and sampling settings: what chat's both modes, rejection-sample,
    compare and gatt-augment use."""

    model: object
    tokenizer: object
    params: object
    generator: object
    source: str
    meta: object = None  # the checkpoint's CheckpointMeta
    timings: object = None  # generate.Timings: what its generation has cost so far

    @classmethod
    def load(cls, path: str, device, dtype: str, max_new_tokens: int, temperature: float, top_p: float, seed,
             purpose: str = "to chat with", adapter: str | None = None):  # fmt: skip
        """``device`` a --device name or a torch.device; ``purpose`` completes the refusal of a reward model;
        ``adapter`` a LoRA adapter file on the model."""
        import time

        import torch

        from llamactl.device import resolve_device
        from llamactl.generate import SamplingParams, Timings
        from llamactl.loading import load_for_inference
        from llamactl.tokenizer import Tokenizer

        dev = device if isinstance(device, torch.device) else resolve_device(device)
        t0 = time.perf_counter()
        model, meta = load_for_inference(path, dev, dtype, "lm", purpose, decode=True, adapter=adapter)
        timings = Timings(load_s=time.perf_counter() - t0)
        params = SamplingParams(max_new_tokens, temperature, top_p, min_new_tokens=1)
        generator = torch.Generator(device=dev).manual_seed(seed)
        return cls(model, Tokenizer(meta.tokenizer, path), params, generator, path, meta, timings)

    @classmethod
    def of(cls, cfg):
        """The model of a command's config: its model, adapter, device, dtype and sampling flags."""
        return cls.load(cfg.model, cfg.device, cfg.dtype, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                        adapter=cfg.adapter)  # fmt: skip

    def compile(self, mode: str, new_tokens: float, rows: int) -> None:
        """The decode step compiled as ``--compile`` says, for a run expected to sample ``new_tokens``, ``rows``
        sequences at a time."""
        from llamactl import compiled

        compiled.enable(self.model, mode, new_tokens, rows)

    @property
    def context(self) -> int:
        return self.model.args.max_seq_len

    def text(self, prompt: list[int], new: list[int]) -> str:
        """The answer's text: the new tokens without their EOS, as the chat format strips it."""
        new = new[:-1] if new and new[-1] == self.tokenizer.eos_id else new
        return self.tokenizer.decode(new).strip()

    def answer_all(self, prompts: list[list[int]], rows: int | None = None) -> list[str]:
        """Answers to prompt token lists, in order, through the engine: ``rows`` decoding at a time (default all)
        with continuous batching."""
        from llamactl.generate import completions

        return [
            self.text(p, c.tokens)
            for p, c in zip(prompts, completions(self.model, prompts, self.params, self.tokenizer.eos_id,
                                                  self.generator, rows=rows, timings=self.timings), strict=True)
        ]  # fmt: skip

    def answer_stream(self, items, rows: int, background: bool = False):
        """(item, answer) for each (item, prompt tokens) of ``items``, in order, each as soon as it and those before
        it are answered; ``rows`` dialogs decode at a time with continuous batching. ``background``: ``items`` is
        input arriving over time (a pipe), read in a thread of its own while the running rows decode."""
        from collections import deque

        from llamactl.generate import completions

        held = deque()

        def prompts():
            for it in items:
                if it is None:
                    yield None
                else:
                    held.append(it)
                    yield it[1]

        for c in completions(self.model, prompts(), self.params, self.tokenizer.eos_id, self.generator, rows=rows,
                             timings=self.timings, background=background):  # fmt: skip
            item, prompt = held.popleft()
            yield item, self.text(prompt, c.tokens)

    def report(self, name: str = "") -> None:
        """The timings line on stderr (``--timings``)."""
        import sys

        print(self.timings.line(name), file=sys.stderr, flush=True)

    def prompt_tokens(self, messages: list[dict], where: str) -> list[int]:
        from llamactl.chat_format import DialogError, encode_prompt

        try:
            ids = encode_prompt(self.tokenizer, messages)
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None
        if len(ids) + 1 > self.context:
            raise UserError(f"{where}: the dialog's {len(ids)} tokens leave no room in the context of {self.context}")
        return ids


def answer_turns(cfg, records: list[tuple[str, dict]]) -> Chatter:
    """Answer every user turn of each record's dialog in turn order, batched across dialogs, each answer seeing the
    answers sampled before it (gatt-augment's sampler). The records' messages are replaced in place."""
    chat = Chatter.of(cfg)
    from llamactl.chat_format import encode_dialog

    dialogs = []
    for where, rec in records:
        msgs = rec["messages"]
        first = 1 if msgs[0]["role"] == "system" else 0
        users = [m for m in msgs[first:] if m["role"] == "user"]
        # the prompt of its last turn (its own earlier answers standing in for the new ones) and a full answer
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        need = len(encode_dialog(chat.tokenizer, msgs[: last_user + 1]).tokens) + cfg.max_new_tokens
        if need > chat.context:
            raise UserError(
                f"{where}: with the instruction on each of its {len(users)} user turns and --max-new-tokens "
                f"{cfg.max_new_tokens}, the dialog needs {need} tokens, more than the context of {chat.context}"
            )
        dialogs.append((where, rec, msgs[:first], users, []))
    turns = max((len(u) for *_, u, _ in dialogs), default=0)
    chat.compile(cfg.compile, sum(len(u) for *_, u, _ in dialogs) * cfg.max_new_tokens, cfg.batch_size)
    for k in range(turns):
        live = [d for d in dialogs if len(d[3]) > k]
        prompts = [chat.prompt_tokens(sys_ + _interleave(users[: k + 1], answers), w)
                   for w, _, sys_, users, answers in live]  # fmt: skip
        texts = chat.answer_all(prompts, rows=cfg.batch_size)
        for _ in range(3):  # an answer of only whitespace is no answer: sample those again
            empty = [i for i, t in enumerate(texts) if not t]
            if not empty:
                break
            for i, t in zip(empty, chat.answer_all([prompts[i] for i in empty], rows=cfg.batch_size), strict=True):
                texts[i] = t
        for (where, *_, answers), text in zip(live, texts, strict=True):
            if not text:
                raise UserError(f"{where}: the model answered turn {k + 1} with nothing, four times")
            answers.append(text)
    for _, rec, sys_, users, answers in dialogs:
        rec["messages"] = sys_ + _interleave(users, answers)
    return chat


def _interleave(users: list[dict], answers: list[str]) -> list[dict]:
    out = []
    for i, u in enumerate(users):
        out.append(u)
        if i < len(answers):
            out.append({"role": "assistant", "content": answers[i]})
    return out


def load_policy(path: str, device, dtype: str, cfg, adapter: str | None = None):
    """A language model (with a LoRA ``adapter`` file) to sample answers from, as a ``Chatter``, and its
    header."""
    chat = Chatter.load(path, device, dtype, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                        purpose="to sample answers from", adapter=adapter)  # fmt: skip
    return chat, chat.meta


def policy_name(model: str, adapter: str | None) -> str:
    """How an output record names the policy that sampled it."""
    return model if adapter is None else f"{model} --adapter {adapter}"
