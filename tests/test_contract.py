"""The contract every command inherits (README, "The contract"), held against a table of bad inputs.

Each row runs the real CLI in a process of its own and asserts: exit code 2, exactly one line on stderr that
names the file, line or flag (the row's needles), no traceback, nothing on stdout, and no change at all on disk:
no output, no temporary file, inputs untouched, a symlink, FIFO or device node where one was. Rows come from two
places: ``SPECS`` (one valid invocation per command, from which the output, input, float-flag and usage rows are
derived; a new command adds its spec, and ``test_every_command_has_a_spec`` fails until it does) and ``CASES``
(hand-written rows for what a command checks of its own).
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import shlex
import shutil
import stat
import struct
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import FIXTURES, run_cli, save_chatty_model

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")
TINY = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=4", "--set", "multiple_of=16"]
PRETRAIN_FLAGS = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--save-every", "1"]
PRETRAIN_FLAGS += ["--dtype", "fp32", *TINY]
PPO_FLAGS = ["--prompts-per-iteration", "1", "--minibatch-size", "1", "--batch-size", "1", "--max-new-tokens", "2"]
PPO_FLAGS += ["--dtype", "fp32"]
SFT_FLAGS = ["--steps", "1", "--seq-len", "32", "--batch-size", "1", "--global-batch-size", "1", "--dtype", "fp32"]


# ------------------------------------------------------------------------------------------------- the inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Valid inputs of every kind, made once: the rows point their commands at these (and must leave them be)."""
    import torch

    from llamactl.checkpoint import CheckpointMeta, plan_from_tensors, write_safetensors
    from llamactl.commands.pretrain import PretrainConfig
    from llamactl.commands.pretrain import run as pretrain
    from llamactl.shards import ShardWriter
    from llamactl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("world")
    w = {"root": str(root)}
    w["tok"] = str(root / "tokenizer.model")
    shutil.copyfile(TOKENIZER, w["tok"])
    tok = Tokenizer.from_file(w["tok"])

    w["model"] = str(root / "model.safetensors")
    model = save_chatty_model(w["model"], max_seq_len=64)
    args = model.args

    # the same weights under headers that lie: absurd context, damaged lineage, a string where a bool belongs
    plans = plan_from_tensors(model.state_dict())
    header = CheckpointMeta(args, tok.model_bytes, {}).to_header()
    for name, change in {
        "huge": {"config": json.dumps({**args.to_dict(), "max_seq_len": 2**34})},
        "lineage": {"lineage": json.dumps({"command": "convert", "inputs": [{"path": "x"}]})},
        "lineage_list": {"lineage": json.dumps(["not", "an", "object"])},
        "stringbool": {"config": json.dumps({**args.to_dict(), "tie_embeddings": "False"})},
        "badtok": {"tokenizer": "not base64!"},
    }.items():
        w[name] = str(root / f"{name}.safetensors")
        write_safetensors(w[name], plans, {**header, **change})

    w["prompts"] = str(root / "prompts.jsonl")
    Path(w["prompts"]).write_text('{"prompt": "Once upon a time"}\n{"tokens": [1, 15043]}\n')
    w["tokens"] = str(root / "tokens.jsonl")
    Path(w["tokens"]).write_text('{"tokens": [1, 15043, 3186]}\n')
    w["text"] = str(root / "corpus.txt")
    lines = [f"The quick brown fox {i} jumps over the lazy dog, and the cat sat on mat {i % 13}." for i in range(400)]
    Path(w["text"]).write_text("\n\n".join(lines) + "\n")

    w["shards"] = str(root / "shards")
    with ShardWriter(w["shards"], tok, shard_tokens=4000, splits=("train", "val")) as writer:
        for i, line in enumerate(lines):
            writer.add(tok.encode(line, bos=True, eos=True), "val" if i % 10 == 0 else "train")

    # a finished run, and copies of it damaged the ways a crash, a disk or an older llamactl leaves them
    w["run"] = str(root / "run")
    cfg = dict(data=w["shards"], output=w["run"], steps=2, seq_len=16, batch_size=2, eval_every=0, save_every=1)
    pretrain(PretrainConfig(**cfg, dtype="fp32", overrides=[o for o in TINY if o != "--set"]))
    step = os.path.join(w["run"], "step-0000002")
    for name, damage in {
        "run_truncated": lambda d: _truncate(os.path.join(d, "trainer.json"), 40),
        "run_empty_json": lambda d: _truncate(os.path.join(d, "trainer.json"), 0),
        # (its step set back, so that --resume has steps to run and reads the shards)
        "run_garbage": lambda d: (
            [_edit_json(os.path.join(d, "trainer.json"), step=1)]
            + [Path(f).write_bytes(b"\x00garbage" * 10) for f in Path(d, "dcp").iterdir()]
        ),
        "run_bad_rng": lambda d: (
            _edit_json(os.path.join(d, "trainer.json"), step=1),
            Path(d, "rng-0.json").write_text('{"python": 1}'),
        ),
        "run_pickle": lambda d: (os.unlink(os.path.join(d, "trainer.json")), Path(d, "trainer.pt").write_bytes(b"x")),
        "run_wrong_state": lambda d: _edit_json(
            os.path.join(d, "trainer.json"), step=1, param_groups=[{"params": ["nope"]}]
        ),
    }.items():
        w[name] = str(root / name)
        shutil.copytree(w["run"], w[name])
        damage(os.path.join(w[name], os.path.basename(step)))
    w["run_latest"] = str(root / "run_latest")
    shutil.copytree(w["run"], w["run_latest"])
    Path(w["run_latest"], "latest").write_text("../../etc\n")

    w["hfdir"] = str(root / "hfdir")
    os.makedirs(w["hfdir"])
    hf = {"model_type": "llama", "hidden_size": 64.0, "num_hidden_layers": 1, "num_attention_heads": 4}
    Path(w["hfdir"], "config.json").write_text(json.dumps({**hf, "vocab_size": 128, "intermediate_size": 96}))
    w["meta_params"] = str(root / "meta")
    os.makedirs(w["meta_params"])
    Path(w["meta_params"], "params.json").write_text(json.dumps({"dim": 32, "n_layers": "2", "n_heads": 4}))
    torch.save({"tok_embeddings.weight": torch.zeros(8, 32), "layers.0.feed_forward.w1.weight": torch.zeros(96, 32)},
               os.path.join(w["meta_params"], "consolidated.00.pth"))  # fmt: skip
    w["l2c"] = str(root / "huge.bin")  # a llama2.c header asking for 2^30 layers
    Path(w["l2c"]).write_bytes(struct.pack("<7i", 64, 128, 2**30, 4, 4, 32, 64) + b"\x00" * 64)
    w["notjson"] = str(root / "notjson.safetensors.index.json")
    Path(w["notjson"]).write_text("{")
    w["base64tok"] = base64.b64encode(b"x").decode()

    # dialogs for sft: one good file, and one file per way a dialog can be wrong (the bad record on line 2)
    good = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    bad = {
        "dialogs_roles": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "dialogs_tag": {"messages": [{"role": "user", "content": "a [INST] b"}, {"role": "assistant", "content": "c"}]},
        "dialogs_empty": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        "dialogs_missing": {"prompt": "a question without its response"},
        "dialogs_nothing": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                            "loss": False}]},
    }  # fmt: skip
    w["dialogs"] = str(root / "dialogs.jsonl")
    Path(w["dialogs"]).write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    for name, rec in bad.items():
        w[name] = str(root / f"{name}.jsonl")
        Path(w[name]).write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
    w["questions"] = str(root / "questions.jsonl")
    Path(w["questions"]).write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    w["no_instructions"] = str(root / "no_instructions.txt")
    Path(w["no_instructions"]).write_text("\n  \n")
    w["notok"] = str(root / "notok.safetensors")
    write_safetensors(w["notok"], plans, {k: v for k, v in header.items() if k != "tokenizer"})
    # preference pairs for train-rm, answers for score: one good file, and one file per way a pair can be wrong
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    w["pairs"] = str(root / "pairs.jsonl")
    Path(w["pairs"]).write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": "four"}) + "\n")
    bad_pairs = {
        "pairs_equal": {**pair, "rejected": "4"},
        "pairs_rating": {**pair, "rating": "way better"},
        "pairs_mixed": {**pair, "rating": "better"},
        "pairs_no_rejected": {"prompt": "2+2?", "chosen": "4"},
    }
    for name, rec in bad_pairs.items():
        w[name] = str(root / f"{name}.jsonl")
        Path(w[name]).write_text(json.dumps(pair) + "\n" + json.dumps(rec) + "\n")
    w["rm"] = str(root / "rm.safetensors")
    rm_args = {**args.to_dict(), "head": "scalar", "tie_embeddings": False}
    rm_state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    rm_state["score.weight"] = torch.zeros(1, args.dim)
    write_safetensors(w["rm"], plan_from_tensors(rm_state), {**header, "config": json.dumps(rm_args)})
    # a reward model whose tokenizer is not the chat model's (one piece's score changed), and a rejection-sample
    # pool written for other prompts
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(tok.model_bytes)
    proto.pieces[1000].score -= 1.0
    w["rm_othertok"] = str(root / "rm_othertok.safetensors")
    othertok = base64.b64encode(proto.SerializeToString()).decode()
    rm_header = {**header, "config": json.dumps(rm_args), "tokenizer": othertok}
    write_safetensors(w["rm_othertok"], plan_from_tensors(rm_state), rm_header)
    from llamactl.commands.quantize import QuantizeConfig
    from llamactl.commands.quantize import run as quantize

    w["qmodel"] = str(root / "qmodel.safetensors")
    quantize(QuantizeConfig(model=w["model"], output=w["qmodel"], scheme="int4", group_size=32))
    w["pool_other"] = str(root / "pool_other.jsonl")
    answered = {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "x"}], "score": 1.0}
    Path(w["pool_other"]).write_text(json.dumps(answered) + "\n")
    return w


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _edit_json(path: str, **changes) -> None:
    doc = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**doc, **changes}))


# ---------------------------------------------------------------------------------------- what must not change


def snapshot(*roots: str) -> dict:
    """Every entry under ``roots`` as lstat shows it (kind, inode, size, mtime, link target, device number)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                seen[p] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns, link, st.st_rdev)
    return seen


def make_special(scratch: Path) -> None:
    """What a row may write over and must not: a FIFO, a symlink to a file, a file, and a device node (root)."""
    os.mkfifo(scratch / "fifo")
    (scratch / "file").write_text("precious\n")
    os.symlink("file", scratch / "link")
    try:
        os.mknod(scratch / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pass


# ------------------------------------------------------------------------------------------------- the table


@dataclass
class Spec:
    """One valid invocation of a command with its output at ``{out}``; ``inputs`` are the placeholders of the
    paths it reads (changed one at a time into bad ones)."""

    argv: list[str]
    out: str = "out.jsonl"  # the output's name in the row's scratch directory
    out_dir: bool = False
    inputs: tuple[str, ...] = ()
    stdin: str | None = None


SPECS: dict[str, Spec] = {
    "convert": Spec(["convert", "{model}", "-o", "{out}"], out="out.safetensors", inputs=("{model}",)),
    "generate": Spec(
        ["generate", "-m", "{model}", "-i", "{prompts}", "-o", "{out}", "--max-new-tokens", "2"],
        inputs=("{model}", "{prompts}"),
    ),
    "pretrain": Spec(["pretrain", "{shards}", "-o", "{out}", *PRETRAIN_FLAGS], out="run", out_dir=True),
    "sft": Spec(
        ["sft", "-m", "{model}", "--data", "{dialogs}", "-o", "{out}", *SFT_FLAGS],
        out="run",
        out_dir=True,
        inputs=("{model}", "{dialogs}"),
    ),  # fmt: skip
    "train-rm": Spec(
        ["train-rm", "-m", "{model}", "--data", "{pairs}", "-o", "{out}", *SFT_FLAGS],
        out="run",
        out_dir=True,
        inputs=("{model}", "{pairs}"),
    ),  # fmt: skip
    "score": Spec(["score", "-m", "{rm}", "-i", "{dialogs}", "-o", "{out}"], inputs=("{rm}", "{dialogs}")),
    "rejection-sample": Spec(
        "rejection-sample -m {model} --rm {rm} -i {questions} -o {out} -k 2 --max-new-tokens 2".split(),
        inputs=("{model}", "{rm}", "{questions}"),
    ),
    "compare": Spec(
        "compare -a {model} -b {model} --rm {rm} -i {questions} -o {out} --max-new-tokens 2".split(),
        inputs=("{model}", "{rm}", "{questions}"),
    ),
    "ppo": Spec(
        ["ppo", "-m", "{model}", "--rm", "{rm}", "--prompts", "{questions}", "-o", "{out}", *PPO_FLAGS],
        out="run",
        out_dir=True,
        inputs=("{model}", "{rm}", "{questions}"),
    ),  # fmt: skip
    "chat": Spec(
        ["chat", "-m", "{model}", "-i", "{questions}", "-o", "{out}", "--max-new-tokens", "2"],
        inputs=("{model}", "{questions}"),
    ),
    "gatt-augment": Spec(["gatt-augment", "-i", "{dialogs}", "-o", "{out}"], inputs=("{dialogs}",)),
    "eval": Spec(
        ["eval", "-m", "{model}", "--data", "{tokens}", "-o", "{out}"], out="out.json", inputs=("{model}", "{tokens}")
    ),
    "quantize": Spec(
        ["quantize", "-m", "{model}", "-o", "{out}", "--scheme", "int8"], out="q.safetensors", inputs=("{model}",)
    ),
    "tokenize train": Spec(
        ["tokenize", "train", "{text}", "-o", "{out}", "--vocab-size", "350"], out="t.model", inputs=("{text}",)
    ),
    "tokenize encode": Spec(["tokenize", "encode", "{text}", "-t", "{tok}", "-o", "{out}"], inputs=("{text}", "{tok}")),
    "tokenize decode": Spec(
        ["tokenize", "decode", "{tokens}", "-t", "{tok}", "-o", "{out}"], inputs=("{tokens}", "{tok}")
    ),
}


@dataclass
class Case:
    id: str
    argv: list[str]
    needles: list[str]
    stdin: str | None = None
    ids: list[str] = field(default_factory=list)


def _commands() -> dict[str, typing.Any]:
    """Every command of the CLI by its path ("tokenize encode"), found in the typer app itself."""
    import typer

    from llamactl.cli import app

    def walk(cmd, path, ctx):
        if hasattr(cmd, "list_commands"):  # a group: its commands (built on first use)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), [*path, name], ctx)
        else:
            yield " ".join(path), cmd

    group = typer.main.get_command(app)
    return dict(walk(group, [], group.make_context("llamactl", ["--help"], resilient_parsing=True)))


def _option_kinds(cmd) -> dict[str, type]:
    """Each option's longest flag with the type its wrapper declares (float, int, str ...)."""
    hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
    kinds = {}
    for p in cmd.params:
        if p.opts and p.opts[0].startswith("-"):
            hint = hints.get(p.name)
            args = typing.get_args(hint) or (hint,)
            kinds[max(p.opts, key=len)] = next((t for t in (float, int, str) if t in args), None)
    return kinds


def derived_cases() -> list[Case]:
    """The rows every command gets from its spec: outputs, inputs, float flags, usage."""
    commands = _commands()
    cases = []
    for name, spec in SPECS.items():
        key = name.replace(" ", "-")
        argv = spec.argv

        def with_out(out: str, argv=argv) -> list[str]:
            return [out if a == "{out}" else a for a in argv]

        def add(id_: str, args: list[str], *needles: str, spec=spec, key=key) -> None:
            cases.append(Case(f"{key}:{id_}", args, list(needles), spec.stdin))

        add("out-empty", with_out(""), "empty path")
        add("out-parent-is-a-file", with_out("{scratch}/file/x"), "file", "not a directory")
        if spec.out_dir:
            add("out-is-a-file", with_out("{scratch}/file"), "{scratch}/file", "not a directory")
            add("out-is-a-fifo", with_out("{scratch}/fifo"), "{scratch}/fifo", "FIFO")
        else:
            add("out-is-a-directory", with_out("{scratch}"), "{scratch}", "is a directory")
        for placeholder in spec.inputs:
            bare = placeholder[1:-1]
            add(f"out-is-input-{bare}", with_out(placeholder), placeholder, "is also an input")
            add(f"out-links-to-input-{bare}", with_out("{to_" + bare + "}"), "also an input")  # the same file
            missing = [a if a != placeholder else "{scratch}/missing" for a in with_out("{scratch}/" + spec.out)]
            add(f"input-missing-{bare}", missing, "{scratch}/missing", "no such")
            as_dir = [a if a != placeholder else "{scratch}" for a in with_out("{scratch}/" + spec.out)]
            add(f"input-is-a-directory-{bare}", as_dir, "{scratch}", "is a directory")
        good = with_out("{scratch}/" + spec.out)
        for flag, kind in _option_kinds(commands[name]).items():
            if kind is float:
                for bad in ("nan", "inf", "-inf"):
                    add(f"{flag}={bad}", [*good, flag, bad], flag, "finite")
            elif kind is int:
                add(f"{flag}=x", [*good, flag, "x"], flag)
        add("unknown-option", [*good, "--no-such-option"], "--no-such-option")
    return cases


OUT = "{scratch}/out.jsonl"
GEN = f"generate -m {{model}} -o {OUT} --max-new-tokens 2"
RUN = " ".join(PRETRAIN_FLAGS)
NEW_RUN = "pretrain {shards} -o {scratch}/r"
RESUME = f"--resume {RUN}"
SFT_RUN = " ".join(SFT_FLAGS)
SFT = f"sft -m {{model}} -o {{scratch}}/r {SFT_RUN}"
RM = f"train-rm -m {{model}} -o {{scratch}}/r {SFT_RUN}"
RS = f"rejection-sample -m {{model}} --rm {{rm}} -o {OUT} --max-new-tokens 2"
CMP = f"compare -a {{model}} -b {{model}} --rm {{rm}} -o {OUT} --max-new-tokens 2"
PPO_RUN = " ".join(PPO_FLAGS)
PPO = f"ppo -m {{model}} -o {{scratch}}/r {PPO_RUN}"
EVAL = f"eval -m {{model}} --data - -o {OUT}"
QUANT = "quantize -m {model} -o {scratch}/q.safetensors"

# (id, command line split as a shell would, what the one line names, stdin)
TABLE: list[tuple] = [
    # usage: one line, not typer's Usage / Try / Error block
    ("usage:no-such-command", "frobnicate", ["No such command"]),
    ("usage:missing-option", "generate", ["--model"]),
    ("usage:missing-argument", f"pretrain -o {OUT}", ["'data'"]),
    ("usage:bad-int", "generate -m {model} --top-k many", ["--top-k"]),
    ("usage:extra-argument", f"convert {{model}} extra -o {OUT}", ["extra"]),
    # generate: records
    ("generate:bad-json-line-2", GEN, ["<stdin>:2", "invalid JSON"], '{"tokens": [1]}\n{"tokens": [1\n'),
    ("generate:out-of-vocab", GEN, ["<stdin>:1", "32000"], '{"tokens": [1, 32000]}\n'),
    ("generate:no-prompt", GEN, ["<stdin>:1", "'prompt'"], '{"text": "hi"}\n'),
    ("generate:not-an-object", GEN, ["<stdin>:1", "JSON object"], "[1, 2]\n"),
    ("generate:not-utf8", GEN, ["<stdin>:1", "UTF-8"], '{"prompt": "\udcff"}\n'),
    ("generate:completion-exists", GEN, ["<stdin>:1", "'completion'"], '{"prompt": "a", "completion": ""}\n'),
    ("generate:finish-reason-exists", GEN, ["'finish_reason'"], '{"tokens": [1], "finish_reason": 1}\n'),
    ("generate:logprobs-exists", GEN + " --logprobs", ["'logprobs'"], '{"tokens": [1], "logprobs": []}\n'),
    ("generate:prompt-too-long", GEN, ["<stdin>:1", "context of 64"], json.dumps({"tokens": [1] * 64})),
    # generate: flags and models
    ("generate:top-p-0", GEN + " --top-p 0", ["--top-p"], ""),
    ("generate:model-is-hf-dir", "generate -m {hfdir}", ["{hfdir}", "is a directory", "convert it first"]),
    ("generate:model-is-fifo", "generate -m {scratch}/fifo", ["{scratch}/fifo", "FIFO"]),
    ("generate:huge-context", "generate -m {huge}", ["{huge}", "max_seq_len 17179869184", "would take"]),
    ("generate:string-for-bool", "generate -m {stringbool}", ["{stringbool}", "tie_embeddings"]),
    ("generate:damaged-tokenizer", "generate -m {badtok}", ["{badtok}", "damaged"]),
    ("generate:index-not-json", "generate -m {notjson}", ["{notjson}", "not a checkpoint index"]),
    # convert
    ("convert:info-damaged-lineage", "convert --info {lineage}", ["{lineage}", "lineage.inputs[0]"]),
    ("convert:info-lineage-list", "convert --info {lineage_list}", ["{lineage_list}", "lineage is list"]),
    ("convert:hf-float-size", "convert {hfdir} -o {scratch}/o.safetensors", ["hidden_size", "integer"]),
    ("convert:meta-string-size", "convert {meta_params} -o {scratch}/o.safetensors", ["n_layers"]),
    ("convert:llama2c-huge", "convert {l2c} -o {scratch}/o.safetensors", ["{l2c}"]),
    ("convert:to-hf-over-a-file", "convert {model} --to hf -o {scratch}/file", ["not a directory"]),
    ("convert:to-hf-into-input-dir", "convert {model} --to hf -o {root}", ["holds the input"]),
    ("convert:tokenizer-is-dir", "convert {model} -o {scratch}/o.safetensors -t {root}", ["--tokenizer", "directory"]),
    ("convert:shard-size", "convert {model} -o {scratch}/o.safetensors --shard-size big", ["--shard-size"]),
    ("convert:info-with-output", "convert --info {model} -o {scratch}/o.safetensors", ["--info"]),
    # tokenize
    ("tokenize-train:vocab-too-small", "tokenize train {text} -o {scratch}/t.model --vocab-size 261",
     ["--vocab-size 261"]),
    ("tokenize-train:coverage", "tokenize train {text} -o {scratch}/t.model --character-coverage 0.5",
     ["--character-coverage"]),
    ("tokenize-train:field-missing", "tokenize train - -o {scratch}/t.model", ["<stdin>:1", "'text'"],
     '{"body": "x"}\n'),
    ("tokenize-encode:tokenizer-is-text", "tokenize encode -t {text}", ["{text}", "SentencePiece"]),
    ("tokenize-encode:tokens-exists", f"tokenize encode -t {{tok}} -o {OUT}", ["<stdin>:1", "'tokens'"],
     '{"text": "a", "tokens": 1}\n'),
    ("tokenize-encode:out-not-shards", "tokenize encode {text} -t {tok} --out {root}",
     ["{root}", "not a token shards directory"]),
    ("tokenize-encode:out-is-a-file", "tokenize encode {text} -t {tok} --out {scratch}/file",
     ["--out", "not a directory"]),
    ("tokenize-decode:bad-id", f"tokenize decode -t {{tok}} -o {OUT}", ["<stdin>:1", "'tokens'[0]"],
     '{"tokens": [-1]}\n'),
    # pretrain
    ("pretrain:set-not-a-field", f"{NEW_RUN} --set depth=3", ["depth"]),
    ("pretrain:set-bool-as-text", f"{NEW_RUN} --set tie_embeddings=yes", ["tie_embeddings", "true or false"]),
    ("pretrain:set-head-scalar", f"{NEW_RUN} --set head=scalar --set tie_embeddings=false", ["head=scalar"]),
    ("pretrain:set-head-unknown", f"{NEW_RUN} --set head=value", ["head must be one of"]),
    ("pretrain:set-float-int", f"{NEW_RUN} --set dim=32.5", ["dim"]),
    ("pretrain:set-no-equals", f"{NEW_RUN} --set dim", ["key=value"]),
    ("pretrain:unknown-preset", f"{NEW_RUN} --preset x", ["--preset"]),
    ("pretrain:too-big", f"{NEW_RUN} {RUN} --set dim=65536 --set n_heads=4 --set n_layers=4096", ["would take"]),
    ("pretrain:out-is-data", "pretrain {shards} -o {shards}", ["is also an input"]),
    ("pretrain:data-is-a-file", "pretrain {text} -o {scratch}/r", ["{text}", "not a token shards"]),
    ("pretrain:existing-run", f"pretrain {{shards}} -o {{run}} {RUN}", ["pass --resume"]),
    ("pretrain:resume-truncated-state", f"pretrain {{shards}} -o {{run_truncated}} {RESUME}",
     ["trainer.json", "damaged trainer state"]),
    ("pretrain:resume-empty-state", f"pretrain {{shards}} -o {{run_empty_json}} {RESUME}",
     ["trainer.json", "damaged trainer state"]),
    ("pretrain:resume-garbage-tensors", f"pretrain {{shards}} -o {{run_garbage}} {RESUME}",
     ["step-0000002", "cannot be loaded"]),
    ("pretrain:resume-damaged-rng", f"pretrain {{shards}} -o {{run_bad_rng}} {RESUME}",
     ["rng-0.json", "damaged RNG state"]),
    ("pretrain:resume-old-pickle", f"pretrain {{shards}} -o {{run_pickle}} {RESUME}", ["trainer.pt"]),
    ("pretrain:resume-wrong-state", f"pretrain {{shards}} -o {{run_wrong_state}} {RESUME}", ["does not fit"]),
    ("pretrain:resume-bad-latest", f"pretrain {{shards}} -o {{run_latest}} {RESUME}", ["latest"]),
    ("pretrain:resume-other-flags", f"pretrain {{shards}} -o {{run}} {RESUME} --lr 1e-3", ["--lr"]),
    # sft
    ("sft:roles-out-of-order", f"{SFT} --data {{dialogs_roles}}", ["{dialogs_roles}:2", "messages[0]"]),
    ("sft:special-tag", f"{SFT} --data {{dialogs_tag}}", ["{dialogs_tag}:2", "[INST]"]),
    ("sft:empty-answer", f"{SFT} --data {{dialogs_empty}}", ["{dialogs_empty}:2", "messages[1]", "empty answer"]),
    ("sft:missing-response", f"{SFT} --data {{dialogs_missing}}", ["{dialogs_missing}:2", "'response'"]),
    ("sft:nothing-to-train-on", f"{SFT} --data {{dialogs_nothing}}", ["{dialogs_nothing}:2", "nothing to train"]),
    ("sft:reward-model", f"sft -m {{rm}} --data {{dialogs}} -o {{scratch}}/r {SFT_RUN}", ["{rm}", "scalar"]),
    ("sft:field-missing", f"{SFT} --data {{dialogs}} --field chosen", ["{dialogs}:1", "'chosen'"]),
    # train-rm and score
    ("train-rm:chosen-equals-rejected", f"{RM} --data {{pairs_equal}}", ["{pairs_equal}:2", "equals"]),
    ("train-rm:unknown-rating", f"{RM} --data {{pairs_rating}}", ["{pairs_rating}:2", "'way better'"]),
    ("train-rm:rated-and-unrated", f"{RM} --data {{pairs_mixed}}", ["{pairs_mixed}:2", "--margin none"]),
    ("train-rm:missing-rejected", f"{RM} --data {{pairs_no_rejected}}", ["{pairs_no_rejected}:2", "'rejected'"]),
    ("train-rm:bad-kind", f"{RM} --data {{pairs}} --kind honesty", ["--kind 'honesty'"]),
    ("train-rm:no-tokenizer", f"train-rm -m {{notok}} --data {{pairs}} -o {{scratch}}/r {SFT_RUN}",
     ["{notok}", "no tokenizer"]),
    ("score:language-model", f"score -m {{model}} -i {{dialogs}} -o {OUT}", ["{model}", "language-model head"]),
    ("score:ends-with-user", f"score -m {{rm}} -i {{questions}} -o {OUT}", ["{questions}:1", "ends with the user"]),
    ("score:field-missing", f"score -m {{rm}} -i {{dialogs}} -o {OUT} --field chosen", ["{dialogs}:1", "'chosen'"]),
    # rejection-sample and compare
    ("rejection-sample:lm-as-rm", f"{RS} -i {{questions}} --rm {{model}}", ["{model}", "reward model"]),
    ("rejection-sample:lm-as-safety-rm", f"{RS} -i {{questions}} --safety-rm {{model}}", ["{model}", "reward model"]),
    ("rejection-sample:rm-as-policy", f"{RS} -i {{questions}} -m {{rm}}", ["{rm}", "a language model is needed"]),
    ("rejection-sample:other-tokenizer", f"{RS} -i {{questions}} --rm {{rm_othertok}}",
     ["--rm {rm_othertok}", "tokenizer differs"]),
    ("rejection-sample:no-tokenizer", f"{RS} -i {{questions}} -m {{notok}}", ["{notok}", "no tokenizer"]),
    ("rejection-sample:k-0", f"{RS} -i {{questions}} -k 0", ["-k must be at least 1"]),
    ("rejection-sample:ends-with-answer", f"{RS} -i {{dialogs}}", ["{dialogs}:1", "ends with an answer"]),
    ("rejection-sample:response-given", RS, ["<stdin>:1", "'response'"], '{"prompt": "a", "response": "b"}\n'),
    ("rejection-sample:no-prompt", RS, ["<stdin>:1", "'prompt'"], '{"text": "a"}\n'),
    ("rejection-sample:is-safety-not-bool", RS, ["<stdin>:1", "'is_safety'"], '{"prompt": "a", "is_safety": 1}\n'),
    ("rejection-sample:score-exists", RS, ["<stdin>:1", "'score'"], '{"prompt": "a", "score": 1}\n'),
    ("rejection-sample:pool-other-prompts", f"{RS} -i {{questions}} --pool {{pool_other}}",
     ["{pool_other}:1", "not one of this run's prompts"]),
    ("rejection-sample:pool-not-a-pool", f"{RS} -i {{questions}} --pool {{questions}}", ["{questions}:1", "--pool"]),
    ("rejection-sample:pool-and-keep-all", f"{RS} -i {{questions}} --pool {{pool_other}} --keep all",
     ["--pool", "--keep all"]),
    ("rejection-sample:keep-unknown", f"{RS} -i {{questions}} --keep worst", ["--keep 'worst'"]),
    ("rejection-sample:answer-outgrows-rm", f"{RS} -i {{questions}} --max-new-tokens 60",
     ["{questions}:1", "context of --rm {rm}"]),
    ("rejection-sample:out-is-pool", "rejection-sample -m {model} --rm {rm} -i {questions} --pool {pool_other} "
     "-o {pool_other}", ["--pool", "is also an input"]),
    ("compare:lm-as-rm", f"{CMP} -i {{questions}} --rm {{model}}", ["{model}", "reward model"]),
    ("compare:rm-as-model-b", f"{CMP} -i {{questions}} -b {{rm}}", ["{rm}", "a language model is needed"]),
    ("compare:other-tokenizer", f"{CMP} -i {{questions}} --safety-rm {{rm_othertok}}",
     ["--safety-rm {rm_othertok}", "tokenizer differs"]),
    ("compare:ends-with-answer", f"{CMP} -i {{dialogs}}", ["{dialogs}:1", "ends with an answer"]),
    ("compare:no-prompts", CMP, ["<stdin>", "no prompts"], ""),
    ("compare:category-not-text", CMP, ["<stdin>:1", "'category'"], '{"prompt": "a", "category": 3}\n'),
    ("compare:tie-margin", f"{CMP} -i {{questions}} --tie-margin -1", ["--tie-margin"]),
    ("compare:keep-is-output", f"{CMP} -i {{questions}} --keep {OUT}", ["--keep", "is the -o/--output"]),
    ("compare:keep-is-input", f"{CMP} -i {{questions}} --keep {{questions}}", ["--keep", "is also an input"]),
    # ppo
    ("ppo:fsdp", f"{PPO} --rm {{rm}} --prompts {{questions}} --distributed fsdp", ["--distributed ddp"]),
    ("ppo:rm-is-a-language-model", f"{PPO} --rm {{model}} --prompts {{questions}}", ["{model}", "reward model"]),
    ("ppo:policy-is-a-reward-model", f"ppo -m {{rm}} --rm {{rm}} --prompts {{questions}} -o {{scratch}}/r {PPO_RUN}",
     ["{rm}", "language model"]),
    ("ppo:prompt-ends-with-answer", f"{PPO} --rm {{rm}} --prompts {{dialogs}}", ["{dialogs}:1", "ends with an answer"]),
    ("ppo:minibatch-does-not-divide", f"{PPO} --rm {{rm}} --prompts {{questions}} --prompts-per-iteration 3 "
     "--minibatch-size 2", ["--prompts-per-iteration 3"]),
    # chat and gatt-augment
    ("chat:reward-model", f"chat -m {{rm}} -i {{questions}} -o {OUT}", ["{rm}", "scalar"]),
    ("chat:no-tokenizer", f"chat -m {{notok}} -i {{questions}} -o {OUT}", ["{notok}", "no tokenizer"]),
    ("chat:ends-with-answer", f"chat -m {{model}} -i {{dialogs}} -o {OUT}", ["{dialogs}:1", "from the user"]),
    ("chat:roles", f"chat -m {{model}} -o {OUT}", ["<stdin>:1", "messages[0]"],
     '{"messages": [{"role": "assistant", "content": "x"}]}\n'),
    ("gatt:empty-instructions", f"gatt-augment -i {{dialogs}} --instructions {{no_instructions}} -o {OUT}",
     ["{no_instructions}", "no instructions"]),
    ("gatt:finalize-with-model", f"gatt-augment -i {{dialogs}} --finalize -m {{model}} -o {OUT}", ["--finalize"]),
    ("gatt:sampling-flag-without-model", f"gatt-augment -i {{dialogs}} --temperature 0.2 --device cuda -o {OUT}",
     ["--temperature, --device", "without -m"]),
    ("gatt:dialog-too-long", f"gatt-augment -i {{dialogs}} -m {{model}} -o {OUT} --max-new-tokens 60",
     ["{dialogs}:1", "context of 64"]),
    # eval
    ("eval:bad-json-line-2", EVAL, ["<stdin>:2", "invalid JSON"], '{"tokens": [1, 2]}\n{"tokens": [1\n'),
    ("eval:field-missing", EVAL, ["<stdin>:1", "'text'"], '{"body": "x"}\n'),
    ("eval:named-field-missing", EVAL + " --field body", ["<stdin>:1", "'body'"], '{"text": "x"}\n'),
    ("eval:out-of-vocab", EVAL, ["<stdin>:1", "32000"], '{"tokens": [1, 32000]}\n'),
    ("eval:tokens-and-text", EVAL, ["<stdin>:1", "'tokens'", "'text'"], '{"tokens": [1, 2], "text": "a"}\n'),
    ("eval:nothing-to-score", EVAL, ["<stdin>", "no token to score"], '{"tokens": [1]}\n{"text": ""}\n'),
    ("eval:stride-over-context", f"eval -m {{model}} --data {{tokens}} -o {OUT} --context 16 --stride 17",
     ["--stride 17", "--context 16"]),
    ("eval:stride-0", f"eval -m {{model}} --data {{tokens}} -o {OUT} --stride 0", ["--stride"]),
    ("eval:context-over-model", f"eval -m {{model}} --data {{tokens}} -o {OUT} --context 65",
     ["--context 65", "{model}", "64"]),
    ("eval:field-of-text", f"eval -m {{model}} --data {{text}} --field body -o {OUT}", ["--field", "{text}"]),
    ("eval:reward-model", f"eval -m {{rm}} --data {{tokens}} -o {OUT}", ["{rm}", "a language model is needed"]),
    ("eval:reference-reward-model", f"eval -m {{model}} --reference {{rm}} --data {{tokens}} -o {OUT}",
     ["{rm}", "--reference"]),
    ("eval:reference-without-tokenizer", f"eval -m {{model}} --reference {{notok}} --data {{tokens}} -o {OUT}",
     ["--reference {notok}", "no tokenizer"]),
    ("eval:text-without-tokenizer", f"eval -m {{notok}} --data {{text}} -o {OUT}", ["{notok}", "no tokenizer"]),
    ("eval:format", f"eval -m {{model}} --data {{tokens}} -o {OUT} --format csv", ["--format"]),
    # quantize, and what a quantized checkpoint cannot do
    ("quantize:scheme", f"{QUANT} --scheme int3", ["--scheme 'int3'"]),
    ("quantize:group-does-not-divide", f"{QUANT} --scheme int4", ["{model}", "--group-size 128", "dim 32"]),
    ("quantize:group-size-odd", f"{QUANT} --scheme int4 --group-size 48", ["--group-size 48"]),
    ("quantize:int8-group", f"{QUANT} --scheme int8 --group-size 32", ["--group-size", "int8"]),
    ("quantize:already-quantized", "quantize -m {qmodel} -o {scratch}/q.safetensors --scheme int8",
     ["{qmodel}", "already quantized"]),
    ("quantize:head-of-reward-model", "quantize -m {rm} -o {scratch}/q.safetensors --scheme int8 --head",
     ["{rm}", "--head"]),
    ("quantize:gptq-flag-alone", f"{QUANT} --scheme int4 --group-size 32 --damp 0.1", ["--damp", "--calibration"]),
    ("quantize:device-without-calibration", f"{QUANT} --scheme int8 --device cpu", ["--device", "--calibration"]),
    ("quantize:field-of-text", f"{QUANT} --scheme int8 --calibration {{text}} --calibration-field body",
     ["--calibration-field", "{text}"]),
    ("quantize:calibration-field", f"{QUANT} --scheme int8 --calibration {{prompts}}", ["{prompts}:1", "'text'"]),
    ("quantize:calibration-too-short", f"{QUANT} --scheme int8 --calibration {{tokens}} --calibration-len 8",
     ["{tokens}", "3 tokens"]),
    ("quantize:not-safetensors", "quantize -m {model} -o {scratch}/q.bin --scheme int8", ["q.bin", ".safetensors"]),
    ("convert:quantized", "convert {qmodel} -o {scratch}/x.safetensors", ["{qmodel}", "quantized"]),
    ("convert:quantized-to-gguf", "convert {qmodel} --to gguf -o {scratch}/x.gguf", ["{qmodel}", "floating-point"]),
    ("sft:quantized-model", f"sft -m {{qmodel}} -o {{scratch}}/r {SFT_RUN} --data {{dialogs}}",
     ["{qmodel}", "quantized", "cannot be trained"]),
    ("train-rm:quantized-model", f"train-rm -m {{qmodel}} -o {{scratch}}/r {SFT_RUN} --data {{pairs}}",
     ["{qmodel}", "quantized"]),
    ("ppo:quantized-policy", f"ppo -m {{qmodel}} -o {{scratch}}/r {PPO_RUN} --rm {{rm}} --prompts {{questions}}",
     ["{qmodel}", "quantized"]),
    ("sft:batch-does-not-divide", f"{SFT} --data {{dialogs}} --global-batch-size 3 --batch-size 2",
     ["--global-batch-size 3"]),
]  # fmt: skip
CASES = [Case(row[0], shlex.split(row[1]), row[2], *row[3:]) for row in TABLE]


ALL = derived_cases() + CASES


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, world, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    make_special(scratch)
    values = {**world, "scratch": str(scratch)}
    for name in sorted({p.strip("{}") for spec in SPECS.values() for p in spec.inputs}):  # links to inputs
        values[f"to_{name}"] = str(scratch / f"link-{os.path.basename(world[name])}")
        os.symlink(world[name], values[f"to_{name}"])
    argv = [a.format(**values) for a in case.argv]
    before = snapshot(world["root"], str(scratch))
    proc = run_cli(*argv, stdin=case.stdin)
    assert proc.returncode == 2, (argv, proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llamactl") and ": error: " in lines[0], lines[0]
    for needle in case.needles:
        assert needle.format(**values) in lines[0], (needle.format(**values), lines[0])
    assert proc.stdout == ""
    assert snapshot(world["root"], str(scratch)) == before  # no output, no temporary file, nothing replaced


@pytest.mark.parametrize("name", list(SPECS))
def test_each_spec_is_a_valid_invocation(name, world, tmp_path):
    """The base of the derived rows succeeds, so each derived row fails for the one thing it changes."""
    spec = SPECS[name]
    out = tmp_path / spec.out
    argv = [a.format(**world, out=str(out)) for a in spec.argv]
    proc = run_cli(*argv, stdin=spec.stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_dir() if spec.out_dir else out.is_file()
    assert "Traceback" not in proc.stderr and "\r" not in proc.stderr  # no progress bar redraws off a terminal


def test_every_command_has_a_spec():
    """A new command joins the contract: give it a spec (and rows in CASES for what it checks of its own)."""
    assert set(_commands()) == set(SPECS)


# ----------------------------------------------------------------------- outputs the table cannot express


def _generate(world, out: str) -> list[str]:
    return ["generate", "-m", world["model"], "-i", world["prompts"], "-o", out, "--max-new-tokens", "2"]


def test_special_outputs_are_written_in_place_and_symlinks_through(world, tmp_path):
    """As shell redirection does: a device stays a device, a FIFO gets the data, a symlink keeps pointing."""
    import threading

    make_special(tmp_path)
    os.symlink("new.jsonl", tmp_path / "dangling")
    for name in ("link", "dangling"):
        proc = run_cli(*_generate(world, str(tmp_path / name)))
        assert proc.returncode == 0, proc.stderr
        assert os.path.islink(tmp_path / name)
    assert len((tmp_path / "file").read_text().splitlines()) == 2  # the target of "link" holds the two results
    assert len((tmp_path / "new.jsonl").read_text().splitlines()) == 2
    got = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "fifo").read_text()))
    reader.start()
    proc = run_cli(*_generate(world, str(tmp_path / "fifo")))
    reader.join(60)
    assert proc.returncode == 0 and len(got[0].splitlines()) == 2, proc.stderr
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    if not os.path.exists(tmp_path / "null"):
        pytest.skip("making a device node needs root")
    proc = run_cli(*_generate(world, str(tmp_path / "null")))
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(tmp_path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "fifo", "file", "link", "new.jsonl", "null"]


def test_a_full_disk_is_one_line(world, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    proc = run_cli(*_generate(world, "/dev/full"))
    assert (
        proc.returncode == 2
        and proc.stderr == "llamactl generate: error: /dev/full: cannot write (No space left on device)\n"
    )
    import subprocess
    import sys

    from helpers import ENV

    with open("/dev/full", "w") as full:  # stdout itself full: `llamactl generate ... > /dev/full`
        proc = subprocess.run([sys.executable, "-m", "llamactl.cli", *_generate(world, "-")], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "llamactl generate: error: <stdout>: cannot write (No space left on device)\n"


def test_shards_get_the_permissions_of_any_new_file(world, tmp_path):
    from llamactl.files import umask

    out = tmp_path / "shards"
    proc = run_cli("tokenize", "encode", world["text"], "-t", world["tok"], "--out", out, "--shard-tokens", "2000")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "reference", "w"):  # what open() gives a new file under this umask
        pass
    want = stat.S_IMODE(os.stat(tmp_path / "reference").st_mode)
    assert want == 0o666 & ~umask()
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert len(modes) > 3 and set(modes.values()) == {want}, modes


def test_resume_never_unpickles(world, tmp_path):
    """A run directory from someone else runs no code: an old-style trainer.pt is refused, not loaded."""
    import pickle

    run = tmp_path / "run"
    shutil.copytree(world["run_pickle"], run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (run / "step-0000002" / "trainer.pt").write_bytes(pickle.dumps(Payload()))
    proc = run_cli("pretrain", world["shards"], "-o", run, "--resume", *PRETRAIN_FLAGS)
    assert proc.returncode == 2 and "trainer.pt" in proc.stderr, proc.stderr
    assert not marker.exists()
    assert sorted(os.listdir(os.path.join(world["run"], "step-0000002"))) == ["dcp", "rng-0.json", "trainer.json"]


def test_resuming_a_finished_run_says_it_is_complete(world):
    before = snapshot(world["run"])
    proc = run_cli("pretrain", world["shards"], "-o", world["run"], "--resume", *PRETRAIN_FLAGS)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(world["run"], "metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    assert f"is complete at step 2 of 2 (last loss {last['loss']:.4f})" in proc.stderr
    assert "nan" not in proc.stderr
    assert snapshot(world["run"]) == before


def test_set_types_values_by_field(world, tmp_path):
    """--set tie_embeddings=false unties (it once stored the string "False", which tied them and broke config.json)."""
    from llamactl.checkpoint import load_tensors, read_meta

    run = tmp_path / "run"
    proc = run_cli("pretrain", world["shards"], "-o", run, *PRETRAIN_FLAGS, "--set", "tie_embeddings=false")
    assert proc.returncode == 0, proc.stderr
    meta = read_meta(str(run / "model.safetensors"))
    assert meta.args.tie_embeddings is False and "output.weight" in load_tensors(str(run / "model.safetensors"))
    proc = run_cli("convert", run / "model.safetensors", "--to", "hf", "-o", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False


def test_config_sizes_match_what_the_model_allocates():
    """The memory checks count what KVCache and the rotary tables really allocate."""
    import torch

    from llamactl.config import kv_cache_bytes, rope_bytes
    from llamactl.model import KVCache, ModelArgs, Transformer

    args = ModelArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=40)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(args, 3, 17, "cpu", dtype)
        assert kv_cache_bytes(args, 3, 17, dtype) == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    model = Transformer(args)
    assert rope_bytes(args) == model.rope_cos.nbytes + model.rope_sin.nbytes


def test_progress_off_a_terminal_is_a_line_now_and_then(monkeypatch, capsys):
    from llamactl import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.progress("pretrain", "step", total=3)
    assert isinstance(bar, progress.LogProgress)  # pytest's stderr is not a terminal
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="1.000")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["pretrain: 1/3 step", "pretrain: 2/3 step", "pretrain: 3/3 step"]
    assert lines[1].endswith(", loss 1.000") and "\r" not in "".join(lines)


def test_progress_shows_a_slow_rate_as_it_is():
    """3 steps in 10 s is 0.3 step/s, not "0 step/s" (a rate under 10 keeps two significant digits)."""
    from llamactl.progress import LogProgress

    bar = LogProgress("sft", "step", total=9)
    bar.n = 3
    assert "(0.3 step/s)" in bar.line(bar.start + 10.0)
    bar.n = 300
    assert "(30 step/s)" in bar.line(bar.start + 10.0)
