"""chat: batch answers equal an independent greedy loop; the interactive session's KV cache holds exactly the
history; driven through a pseudo-terminal as a person uses it (streaming, /retry, /undo, overflow, Ctrl-C)."""

import contextlib
import json
import os
import pty
import select
import signal
import sys
import time

import pytest
import sentencepiece as spm
import torch
from helpers import ENV, FIXTURES, run_cli, save_chatty_model

from llamactl.commands.chat import ChatConfig, Session
from llamactl.loading import load_model

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "m.safetensors")
    save_chatty_model(path, max_seq_len=96)
    return path


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards over the whole sequence: no KV cache, no engine."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]), output="logits")[0, -1].argmax())
            out.append(nxt)
            if nxt == 2:
                break
    return out


def test_batch_answers_are_the_greedy_continuation(model_path, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    dialogs = [
        {"messages": [{"role": "user", "content": "Hello there"}]},
        {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
    ]
    stdin = "".join(json.dumps(d) + "\n" for d in dialogs)
    proc = run_cli("chat", "-m", model_path, "--temperature", "0", "--max-new-tokens", "6", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out[1]["id"] == 7 and [m["role"] for m in out[1]["messages"]] == ["system", "user", "assistant"]
    model, _ = load_model(model_path)
    prompts = [
        [1] + sp.encode("[INST] Hello there [/INST]"),
        [1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhy? [/INST]"),
    ]
    for rec, ids in zip(out, prompts, strict=True):
        new = [t for t in _greedy(model, ids, 6) if t != 2]
        assert rec["messages"][-1]["content"] == sp.decode(new).strip()


def test_session_cache_holds_exactly_the_history(model_path):
    """After two turns the cache's next-token logits equal a full forward over the tokens the session says it fed,
    and those start with the first turn's prompt as sentencepiece encodes it; /undo rewinds the cache to before the
    turn (what /retry does is shown with sampling, below: greedy, a retry and a no-op look the same)."""
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    s = Session(ChatConfig(model=model_path, temperature=0, max_new_tokens=5, dtype="fp32"))
    first = s.answer("Hi")
    s.answer("And then?")
    assert s.fed[: len(sp.encode("[INST] Hi [/INST]")) + 1] == [1] + sp.encode("[INST] Hi [/INST]")
    assert s.cache.lengths == [len(s.fed)] and s.fed.count(2) == 2  # each answer closed by its EOS
    from llamactl.generate import prefill

    probe = [1] + sp.encode("[INST] x [/INST]")
    cached = prefill(s.chat.model, s.cache, [probe])[0]
    with torch.no_grad():
        full = s.chat.model(torch.tensor([s.fed + probe]), output="logits")[0, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    s.cache.truncate(len(s.fed))
    mark = s.marks[-1]
    before = list(s.fed)
    s.handle("/undo")
    assert s.cache.lengths == [mark] and s.fed == before[:mark] and s.turns == [("Hi", first)]


def _cache_is_the_history(s: Session) -> None:
    """The session's cache holds exactly ``s.fed``: its logits for a probe equal a full forward over fed + probe."""
    from llamactl.generate import prefill

    assert s.cache.lengths == [len(s.fed)]
    probe = [1, 518, 25580, 29962]  # BOS "[INST]"
    cached = prefill(s.chat.model, s.cache, [probe])[0]
    with torch.no_grad():
        full = s.chat.model(torch.tensor([s.fed + probe]), output="logits")[0, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    s.cache.truncate(len(s.fed))


def test_retry_replaces_the_last_answer_and_undo_drops_the_last_exchange(model_path):
    """Sampling (temperature 1, seed 0): /retry keeps the number of turns and the first turn as they were, and
    replaces the last answer by a new sample of the same prompt: the tokens fed are the history before that turn,
    the turn's prompt as sentencepiece encodes it, then the new answer closed by EOS. /undo then drops exactly the
    last exchange, cache included, and a second /undo the first."""
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    s = Session(ChatConfig(model=model_path, temperature=1.0, top_p=1.0, max_new_tokens=8, dtype="fp32", seed=0))
    first = s.answer("Hi")
    second = s.answer("And then?")
    mark0, mark1 = s.marks
    head = s.fed[:mark1]  # the first exchange, as fed
    assert mark0 == 0 and head[-1] == 2 and s.fed[mark1:].count(2) == 1
    _cache_is_the_history(s)

    s.handle("/retry")
    assert len(s.turns) == 2 and s.turns[0] == ("Hi", first) and s.turns[1][0] == "And then?"
    again = s.turns[1][1]
    assert again != second and again  # a new sample (32,000 tokens at temperature 1: the same 8 are no chance)
    prompt = [1] + sp.encode("[INST] And then? [/INST]")
    assert s.marks == [0, mark1] and s.fed[:mark1] == head  # the first exchange is untouched
    assert s.fed[mark1 : mark1 + len(prompt)] == prompt
    answer = s.fed[mark1 + len(prompt) :]
    assert answer[-1] == 2 and 2 not in answer[:-1] and sp.decode(answer[:-1]).strip() == again
    _cache_is_the_history(s)

    s.handle("/retry")  # and again: another sample, still two turns
    assert len(s.turns) == 2 and s.turns[0] == ("Hi", first) and s.turns[1][1] not in (second, again)

    s.handle("/undo")
    assert s.turns == [("Hi", first)] and s.fed == head and s.marks == [0]
    _cache_is_the_history(s)
    s.handle("/undo")
    assert s.turns == [] and s.fed == [] and s.marks == [] and s.cache.lengths == [0]


def _expect(fd: int, pattern: str, buf: list[str], timeout: float = 60.0) -> str:
    """Read the pty until ``pattern`` shows up in what was read since the last match; return that text."""
    end = time.monotonic() + timeout
    text = ""
    while pattern not in text:
        left = end - time.monotonic()
        assert left > 0, f"waited for {pattern!r}; the screen showed:\n{''.join(buf)}{text}"
        if select.select([fd], [], [], left)[0]:
            try:
                data = os.read(fd, 4096).decode(errors="replace")
            except OSError:
                data = ""
            assert data, f"the session ended while waiting for {pattern!r}:\n{''.join(buf)}{text}"
            text += data
    buf.append(text)
    return text


@contextlib.contextmanager
def _terminal(args: list[str]):
    """``llamactl chat ARGS`` on a pseudo-terminal: yields (pid, fd, screen); never leaves the child behind."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal's end of the pty
        os.execve(sys.executable, [sys.executable, "-m", "llamactl.cli", "chat", *args], ENV)
    screen: list[str] = []
    try:
        yield pid, fd, screen
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(fd)
    assert "Traceback" not in "".join(screen)


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_person_at_the_terminal(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_chatty_model(path, max_seq_len=64)
    args = ["-m", path, "--max-new-tokens", "12", "--temperature", "0", "--dtype", "fp32"]
    with _terminal(args) as (pid, fd, screen):
        _expect(fd, "> ", screen)
        os.write(fd, b"Hello\n")
        answer = _expect(fd, "> ", screen)
        assert len(answer.strip().splitlines()) >= 2  # the echoed line, then the streamed answer
        os.write(fd, b"/retry\n")
        assert _expect(fd, "> ", screen).splitlines()[1] == answer.splitlines()[1]  # greedy: the same answer
        os.write(fd, b"/undo\n")
        assert "(last exchange removed)" in _expect(fd, "> ", screen)
        for i in range(4):  # 64 tokens of context: the history overflows within a few turns
            os.write(fd, f"Tell me more about item {i}\n".encode())
            _expect(fd, "> ", screen)
        assert "outgrew the model's context" in "".join(screen)
        assert "".join(screen).count("outgrew") == 1  # said once
        os.write(fd, b"/save /nonexistent-dir/x.jsonl\n")
        assert "error:" in _expect(fd, "> ", screen)  # an error line, and the session goes on
        os.write(fd, b"/save " + str(tmp_path / "d.jsonl").encode() + b"\n")
        _expect(fd, "> ", screen)
        os.write(fd, b"\x04")  # Ctrl-D ends the session
        assert _exit_code(pid) == 0
    saved = json.loads(open(tmp_path / "d.jsonl").read())
    assert saved["messages"][-1]["role"] == "assistant"


def test_ctrl_c_stops_the_answer_not_the_session(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_chatty_model(path, max_seq_len=4096)
    args = ["-m", path, "--max-new-tokens", "4000", "--temperature", "1", "--dtype", "fp32"]
    with _terminal(args) as (pid, fd, screen):
        _expect(fd, "> ", screen)
        os.write(fd, b"Write a long story\n")
        _expect(fd, "story", screen)  # the echo
        time.sleep(1.0)  # tokens are streaming now (4000 of them take far longer)
        os.write(fd, b"\x03")
        assert "[stopped]" in _expect(fd, "> ", screen)
        os.write(fd, b"/exit\n")
        assert _exit_code(pid) == 0


def test_answers_that_fill_the_context(tmp_path, capsys):
    """--max-new-tokens past the context: an answer stops at the context's end, and the next turn drops it."""
    path = str(tmp_path / "m.safetensors")
    save_chatty_model(path, max_seq_len=48)
    s = Session(ChatConfig(model=path, temperature=0, max_new_tokens=100, dtype="fp32"))
    s.chat.params.min_new_tokens = 100  # no EOS: every answer runs to the end of the context
    for question in ("Hi", "Again", "Once more"):
        s.answer(question)
        assert s.cache.lengths == [len(s.fed)] and len(s.fed) <= 48
    assert [u for u, _ in s.turns] == ["Once more"]
    assert "outgrew" in capsys.readouterr().err
