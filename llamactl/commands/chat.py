"""``llamactl chat``: talk to a chat model in a terminal, or answer dialogs from JSONL in a pipeline.

On a terminal, answers stream as they are generated and each turn reuses the KV cache of the history (a new turn
costs its own tokens, not the history's). In-session commands follow the Llama 2 demo's buttons: /retry, /undo,
/clear, /system TEXT, /save FILE, /help. When stdin is not a terminal (or with ``--batch``), dialogs JSONL come in
(``{"messages": [...]}`` ending with a user turn) and go out with the answer appended, batched through the same
generation engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import SamplingFlags

HELP = """commands:
  /retry         a new answer to your last message
  /undo          drop the last exchange
  /clear         start over (the system prompt stays)
  /system TEXT   set the system prompt (empty TEXT removes it); the conversation starts over
  /save FILE     append the dialog to FILE as one JSONL record (what sft and chat --load read)
  /stats         load time, prompt and decode tokens/s so far (--timings prints them at exit too)
  /help          this list
Ctrl-C stops an answer; Ctrl-D (or /exit) ends the session."""


@dataclass(kw_only=True)
class ChatConfig(SamplingFlags):
    model: str
    system: str | None = None
    load: str | None = None  # a dialog JSONL (the last record) to continue
    batch: bool = False  # JSONL in, JSONL out, even on a terminal
    input: str = "-"
    output: str = "-"
    adapter: str | None = None  # a LoRA adapter trained on the model

    def validate(self) -> None:
        from llamactl.files import io_problems
        from llamactl.flags import sampling_problems

        problems = sampling_problems(self)
        problems += io_problems(
            [
                ("-m/--model", self.model, "checkpoint", False),
                ("--adapter", self.adapter, "adapter file", False),
                ("--load", self.load, "dialog JSONL file", False),
                ("-i/--input", self.input, "dialogs JSONL file", True),
            ],
            self.output,
        )
        if problems:
            raise UserError("; ".join(problems))


def run(cfg: ChatConfig) -> int:
    cfg.validate()
    interactive = not cfg.batch and cfg.input == "-" and sys.stdin.isatty()
    if not interactive:
        return run_batch(cfg)
    return Session(cfg).loop()


def run_batch(cfg: ChatConfig) -> int:
    """Dialogs JSONL in, each out with the answer appended to ``messages``, in order, flushed batch by batch."""
    from llamactl.chat_format import DialogError, check_dialog
    from llamactl.jsonl import BATCH_WAIT_S, dumps, open_output, parsed_records
    from llamactl.policy import Chatter

    chat = Chatter.of(cfg)

    def parse(where: str, rec: dict):
        try:
            messages = check_dialog(rec.get("messages"))
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None
        if cfg.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system}, *messages]
        return rec, messages, chat.prompt_tokens(messages, where)

    items, total = parsed_records(cfg.input, parse, BATCH_WAIT_S)  # a file is checked whole before anything is written
    rows = cfg.batch_size if total is None else max(1, min(cfg.batch_size, total))
    chat.compile(cfg.compile, (total or rows) * cfg.max_new_tokens, rows)  # a pipe's work reckoned as one batch's
    n = 0
    with open_output(cfg.output) as out:
        # continuous batching: a finished dialog's row takes the next one; answers come out in input order
        pairs = (None if it is None else ((it[0], it[1]), it[2]) for it in items)
        for (rec, messages), text in chat.answer_stream(pairs, rows, background=total is None):
            out.write(dumps({**rec, "messages": [*messages, {"role": "assistant", "content": text}]}) + "\n")
            out.flush()
            n += 1
    if cfg.timings:
        chat.report()
    return n


class Session:
    """The interactive chat: a history of messages and one KV cache that holds exactly the tokens fed so far."""

    def __init__(self, cfg: ChatConfig):
        from llamactl.model import KVCache
        from llamactl.policy import Chatter

        self.cfg = cfg
        self.chat = Chatter.of(cfg)
        self.chat.compile(cfg.compile, self.chat.context, 1)  # a session may fill its context
        weight = self.chat.model.tok_embeddings.weight
        self.cache = KVCache(self.chat.model.args, 1, self.chat.context, weight.device, weight.dtype)
        self.system = cfg.system
        self.turns: list[tuple[str, str]] = []  # (user, answer)
        self.fed: list[int] = []  # the tokens in the cache, in order
        self.marks: list[int] = []  # len(self.fed) before each turn's prompt
        self.told_overflow = False
        if cfg.load:
            self._load(cfg.load)

    # -- the dialog as messages, and the cache ------------------------------------------------------------------

    def messages(self, extra_user: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        if extra_user is not None:
            msgs.append({"role": "user", "content": extra_user})
        return msgs

    def reset(self) -> None:
        self.cache.truncate(0)
        self.fed, self.marks = [], []

    def rebuild(self) -> None:
        """Re-encode the history into the cache (after /system, /load, or an overflow)."""
        from llamactl.chat_format import encode_dialog
        from llamactl.generate import prefill

        self.reset()
        for k in range(len(self.turns)):
            msgs = self.messages()[: (1 if self.system else 0) + 2 * (k + 1)]
            tokens = encode_dialog(self.chat.tokenizer, msgs).tokens
            self.marks.append(len(self.fed))
            new = tokens[len(self.fed) :]
            prefill(self.chat.model, self.cache, [new], self.chat.timings)
            self.fed += new

    def _load(self, path: str) -> None:
        from llamactl.chat_format import DialogError, check_dialog
        from llamactl.jsonl import display_name, read_jsonl

        last = None
        for item in read_jsonl(path):
            last = item
        if last is None:
            raise UserError(f"{display_name(path)}: no dialog in it")
        where = f"{display_name(path)}:{last[0]}"
        try:
            msgs = check_dialog(last[1].get("messages"))
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None
        if msgs[-1]["role"] != "assistant":
            msgs = msgs[:-1]  # a trailing question is asked again by the user, not answered on load
        if msgs and msgs[0]["role"] == "system":
            self.system, msgs = msgs[0]["content"], msgs[1:]
        self.turns = [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2], strict=False)]
        self.rebuild()

    def fit_turn(self, user: str) -> list[int]:
        """The tokens of the new turn's prompt (BOS [INST] user [/INST], the system prompt merged into the first), after
        dropping the oldest exchanges if the history has outgrown the context (the system prompt stays; the user is
        told once). Pairs are encoded independently in Llama 2's format, so the cache's tokens stay a prefix."""
        from llamactl.chat_format import DialogError, dialog_turns

        while True:
            try:
                _, final = dialog_turns(self.messages(user))
            except DialogError as e:
                raise UserError(str(e)) from None
            new = self.chat.tokenizer.encode(final, bos=True)
            # room for the prompt, a whole answer and the EOS that closes it in the cache
            if len(self.fed) + len(new) + self.cfg.max_new_tokens + 1 <= self.chat.context or not self.turns:
                break
            self.turns.pop(0)
            if not self.told_overflow:
                self.say("(the conversation outgrew the model's context: its oldest exchanges are dropped from now on)")
                self.told_overflow = True
            self.rebuild()
        if len(self.fed) + len(new) + 2 > self.chat.context:  # not even a one-token answer and its EOS fit
            raise UserError(f"that message takes {len(new)} tokens; the context holds {self.chat.context}")
        return new

    # -- one answer ---------------------------------------------------------------------------------------------

    def answer(self, user: str) -> str | None:
        """Stream the answer to ``user``; the turn is kept (a Ctrl-C keeps what was said so far)."""
        from llamactl.generate import prefill, stream

        new = self.fit_turn(user)
        self.marks.append(len(self.fed))
        logits = prefill(self.chat.model, self.cache, [new], self.chat.timings)
        self.fed += new
        tokens: list[int] = []
        shown = ""
        out = sys.stdout
        steps = stream(self.chat.model, self.cache, logits, self.chat.params, self.chat.tokenizer.eos_id,
                       self.chat.generator, shrink=False, timings=self.chat.timings)  # fmt: skip
        try:
            for step in steps:
                tokens.append(int(step.tokens[0]))
                text = self.chat.text([], tokens)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # not mid-way through a UTF-8 character
                    out.write(text[len(shown) :])
                    out.flush()
                    shown = text
        except KeyboardInterrupt:
            out.write(" [stopped]")
        finally:
            steps.close()
        out.write("\n")
        out.flush()
        # The cache holds every sampled token but the last (the stream does not feed it); close the answer with EOS
        # as the chat format does, so the next turn's BOS follows it.
        fed_answer = tokens[:-1]
        self.cache.lengths = [len(self.fed) + len(fed_answer)]
        self.fed += fed_answer
        tail = [t for t in tokens[len(fed_answer) :] if t != self.chat.tokenizer.eos_id] + [self.chat.tokenizer.eos_id]
        tail = tail[: self.chat.context - len(self.fed)]  # an answer that filled the context: the next turn drops it
        if tail:
            prefill(self.chat.model, self.cache, [tail], self.chat.timings)
            self.fed += tail
        answer = self.chat.text([], tokens)
        self.chat.timings.sequences += 1
        self.turns.append((user, answer))
        return answer

    # -- the session --------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def loop(self) -> int:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        self.say(f"llamactl chat with {self.chat.source} ({self.chat.context} tokens of context); /help for commands")
        try:
            return self._loop()
        finally:
            if self.cfg.timings:
                self.chat.report()

    def _loop(self) -> int:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return len(self.turns)
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            try:
                self.handle(line)
            except UserError as e:
                self.say(f"error: {e}")
            if line.strip() in ("/exit", "/quit"):
                return len(self.turns)

    def handle(self, line: str) -> None:
        cmd, _, arg = line.strip().partition(" ")
        if not cmd.startswith("/"):
            self.answer(line)
        elif cmd in ("/exit", "/quit"):
            return
        elif cmd == "/help":
            self.say(HELP)
        elif cmd == "/retry":
            if not self.turns:
                raise UserError("nothing to retry yet")
            user, _ = self.turns.pop()
            self._truncate(self.marks.pop())
            self.answer(user)
        elif cmd == "/undo":
            if not self.turns:
                raise UserError("nothing to undo")
            self.turns.pop()
            self._truncate(self.marks.pop())
            self.say("(last exchange removed)")
        elif cmd == "/clear":
            self.turns = []
            self.reset()
            self.say("(conversation cleared" + (", system prompt kept)" if self.system else ")"))
        elif cmd == "/system":
            self.system = arg.strip() or None
            self.turns = []
            self.reset()
            self.say("(system prompt " + ("set" if self.system else "removed") + "; conversation started over)")
        elif cmd == "/save":
            self.save(arg.strip())
        elif cmd == "/stats":
            self.chat.report()
        else:
            raise UserError(f"unknown command {cmd}; /help lists them")

    def _truncate(self, n: int) -> None:
        self.cache.truncate(n)
        self.fed = self.fed[:n]

    def save(self, path: str) -> None:
        from llamactl.files import os_reason
        from llamactl.jsonl import dumps

        if not path:
            raise UserError("/save needs a file name")
        if not self.turns:
            raise UserError("nothing to save yet")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(dumps({"messages": self.messages()}) + "\n")
        except OSError as e:
            raise UserError(f"{path}: {os_reason(e)}") from None
        self.say(f"(saved to {path})")
