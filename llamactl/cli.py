"""The ``llamactl`` command line: one thin typer wrapper per subcommand.

Nothing heavy is imported at module level so that ``llamactl --help`` stays instant; each wrapper imports its
command module, builds the typed config and calls ``run(cfg)``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup


class LazyGroup(TyperGroup):
    """A command group whose commands are registered by name and help text alone (``config_command``): a command is
    built, and its module imported (most import torch), only when it runs or shows its own help, so ``llamactl
    --help`` and a mistyped command answer without importing any command module."""

    specs: dict[str, dict] = {}  # name -> config_command's arguments, in registration order (one dict per subclass)

    def list_commands(self, ctx) -> list[str]:
        return [*self.specs, *(name for name in super().list_commands(ctx) if name not in self.specs)]

    def get_command(self, ctx, name: str):
        if name in self.specs and name not in self.commands:
            self.commands[name] = _build_command(name, **self.specs[name])
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        """The group's help lists each command with the start of its help text, from the registration alone."""
        import inspect

        shorten = _click().utils.make_default_short_help
        rows = []
        for name in self.list_commands(ctx):
            if name in self.specs and name not in self.commands:
                rows.append((name, lambda limit, name=name: shorten(inspect.cleandoc(self.specs[name]["help"]), limit)))
            elif (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, short(limit)) for name, short in rows])


def lazy_typer(**settings) -> typer.Typer:
    """A typer app (or sub-app) whose ``config_command``s are built on first use (``LazyGroup``)."""
    group = type("LazyGroup", (LazyGroup,), {"specs": {}})
    return typer.Typer(cls=group, rich_markup_mode=None, **settings)


app = lazy_typer(
    name="llamactl",
    help="The Llama 2 recipe as composable command-line stages: JSONL and safetensors in, JSONL and safetensors out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": bool(os.environ.get("LLAMACTL_DEBUG"))}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    if debug:
        _state["debug"] = True


def _click():
    """The click that typer runs on: a copy of its own in newer typer versions, the click package in older ones."""
    try:
        import typer._click as click
        import typer._click.exceptions
        import typer._click.globals
        import typer._click.utils  # noqa: F401
    except ImportError:
        import click
    return click


def _error(message: str, where: str | None = None) -> None:
    """The one line a failed command prints: what ran, then what is wrong."""
    if where is None:
        ctx = _click().globals.get_current_context(silent=True)
        where = ctx.command_path if ctx is not None else "llamactl"
    message = " ".join(message.split("\n"))  # one line, whatever the message was built from
    typer.secho(f"{where}: error: {message}", fg=typer.colors.RED, err=True)


def _flag(param: str) -> str:
    """The command-line name of the parameter ``param`` of the command running now (its longest option)."""
    ctx = _click().globals.get_current_context(silent=True)
    for p in ctx.command.params if ctx is not None else []:
        if p.name == param and p.opts:
            return max(p.opts, key=len)
    return "--" + param.replace("_", "-")


def _check_finite(kwargs: dict) -> None:
    """Every float flag of every command is a finite number: nan and inf would reach the arithmetic."""
    from llamactl.errors import UserError

    bad = [f"{_flag(k)} must be a finite number, got {v}" for k, v in kwargs.items() if _not_finite(v)]
    if bad:
        raise UserError("; ".join(bad))


def _not_finite(v) -> bool:
    import math

    return isinstance(v, float) and not math.isfinite(v)


def run_command(module: str, config_cls: str, entry: str = "run", **kwargs):
    """Import llamactl.commands.<module>, build its config, call ``entry`` (run) with it.

    The contract every command inherits: a user mistake (UserError) or an OSError on a path the user named prints
    one line and exits with code 2; an interruption (Ctrl-C, SIGTERM, SIGHUP) exits with 128 + the signal after
    the work has unwound (temporary files removed); ``--debug`` shows the traceback instead.
    """
    import importlib

    from llamactl.errors import UserError
    from llamactl.files import os_reason

    try:
        _check_finite(kwargs)
        mod = importlib.import_module(f"llamactl.commands.{module}")
        cfg = getattr(mod, config_cls)(**kwargs)
        return getattr(mod, entry)(cfg)
    except UserError as e:
        if _state["debug"]:
            raise
        _error(str(e))
        raise typer.Exit(2) from None
    except BrokenPipeError:
        # The reader of our stdout went away (`| head`): not an error of ours.
        _quiet_stdout()
        raise typer.Exit(0) from None
    except OSError as e:
        if _state["debug"]:
            raise
        paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        _error(f"{paths}: {os_reason(e)}" if paths else os_reason(e))
        raise typer.Exit(2) from None
    except EOFError as e:  # a reader that met the end of a truncated file (click would print a bare "Aborted!")
        if _state["debug"]:
            raise
        _error(f"unexpected end of input{f' ({e})' if str(e) else ''}; a file is truncated")
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        _error("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")
        raise typer.Exit(128 + signum) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a reader that left or a full disk goes nowhere,
    instead of failing again at exit with a second message."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


tokenize_app = lazy_typer(
    help="SentencePiece BPE with Llama 2's settings: train a tokenizer, encode text or chat dialogs, decode ids.",
    no_args_is_help=True,
)
app.add_typer(tokenize_app, name="tokenize")


def config_command(
    name: str,
    module: str,
    config_cls: str,
    help: str,
    flags: dict[str, str | None],
    short: dict[str, str] | None = None,
    arguments: tuple[str, ...] = (),
    names: dict[str, str] | None = None,
    entry: str = "run",
    group: typer.Typer | None = None,
) -> None:
    """Register ``llamactl NAME`` with one option per field of the command's config dataclass: the types and defaults
    are the dataclass's (one copy of each default, in the command module), the help texts are ``flags``'s. Every
    field but ``argv`` needs a help text here, so a new config field cannot go unexposed. ``arguments`` are
    positional; ``names`` gives an option another name than its field's (``overrides`` -> ``--set``); ``entry`` is
    the function of the command module to call, ``group`` the sub-app to register in (``tokenize``). Nothing is
    imported here: the command is built when it is first used (``LazyGroup``)."""
    spec = dict(module=module, config_cls=config_cls, help=help, flags=flags, short=short, arguments=arguments)
    (group or app).info.cls.specs[name] = {**spec, "names": names, "entry": entry}


def _build_command(
    name: str,
    module: str,
    config_cls: str,
    help: str,
    flags: dict[str, str | None],
    short: dict[str, str] | None,
    arguments: tuple[str, ...],
    names: dict[str, str] | None,
    entry: str,
):
    """The click command of a ``config_command`` registration, built from its config dataclass."""
    import dataclasses
    import importlib
    import inspect
    import typing

    cls = getattr(importlib.import_module(f"llamactl.commands.{module}"), config_cls)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name != "argv"]
    missing = {f.name for f in fields} ^ set(flags)
    assert not missing, f"{config_cls}: fields and help texts differ on {sorted(missing)}"
    fields = [f for f in fields if flags[f.name] is not None]  # None: a shared field this command does not take
    params = []
    for f in fields:
        flag = (names or {}).get(f.name, "--" + f.name.replace("_", "-"))
        opts = [flag] + ([short[f.name]] if short and f.name in short else [])
        if hints[f.name] in (bool, bool | None):  # a switch; None (tri-state) leaves the choice to the command
            opts = [f"{flag}/--no-{flag[2:]}"]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        option = typer.Argument(help=flags[f.name]) if f.name in arguments else typer.Option(*opts, help=flags[f.name])
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hints[f.name], option]
            )
        )

    takes_argv = "argv" in {f.name for f in dataclasses.fields(cls)}

    def command(**kwargs) -> None:
        kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
        run_command(module, config_cls, entry, **kwargs, **({"argv": sys.argv[1:]} if takes_argv else {}))

    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # the required ones first in --help
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    single = typer.Typer(rich_markup_mode=None, add_completion=False)
    single.command(name=name, help=help)(command)
    return typer.main.get_command(single)


INPUTS_HELP = "Text or JSONL files (.jsonl is JSONL unless --format says); - is stdin."
TIMINGS_HELP = "At the end, one line on stderr: load time, prompt and decode tokens and tokens/s (as llama.cpp prints)."
COMPILE_HELP = (
    "The decode step compiled (torch.compile; CUDA graphs on a GPU): auto (where the run's new tokens repay the "
    "compile, said on stderr), always, never (eager, the reference)."
)
ADAPTER_HELP = "LoRA adapter file trained on -m/--model (a quantized copy of it too), applied to it."
FORMAT_HELP = "auto (.jsonl files and stdin are JSONL, other files text), text or jsonl."

config_command(
    "convert",
    "convert",
    "ConvertConfig",
    "Convert checkpoints: Meta, Hugging Face, llama2.c, GGUF or a training checkpoint (RUN/step-N, or a run's "
    "latest) in; llamactl, Hugging Face or GGUF (llama.cpp) out; "
    "--merge-adapter merges a LoRA adapter into SRC; an adapter as SRC exports for Hugging Face PEFT (--to peft). "
    "--info describes a checkpoint or an adapter.",
    short={"output": "-o", "tokenizer": "-t"},
    arguments=("src",),
    names={"src_format": "--from"},
    flags={
        "src": "Checkpoint file or directory, or a LoRA adapter file (--to peft, --info).",
        "output": "Destination file (or directory for hf and peft).",
        "info": "Print what SRC is (config, size, dtype, lineage; an adapter's rank, targets and base).",
        "src_format": "auto, llamactl, meta, hf, llama2c, gguf or run (a training checkpoint RUN/step-N, or a run "
        "directory: its latest).",
        "to": "llamactl, hf, gguf, or peft (an adapter SRC as PEFT's adapter_config.json + adapter_model.safetensors, "
        "for the base exported with --to hf).",
        "merge_adapter": "LoRA adapter file trained on SRC: write SRC with it merged in (W + alpha/rank B A; a "
        "quantized SRC gives a floating-point model).",
        "tokenizer": "SentencePiece model to attach.",
        "dtype": "keep (as stored), fp32, bf16 or fp16.",
        "shard_size": "Split llamactl output into shards above this size.",
        "gguf_type": "GGUF tensor type: f32, f16, bf16 or q8_0 [default: each tensor's dtype]; norms stay f32.",
    },
)

config_command(
    "train",
    "tokenize",
    "TrainConfig",
    "Train a BPE tokenizer.model with Llama 2's settings on text and JSONL fields.",
    short={"output": "-o"},
    arguments=("inputs",),
    entry="run_train",
    group=tokenize_app,
    flags={
        "inputs": INPUTS_HELP,
        "output": "The SentencePiece model file to write.",
        "vocab_size": "Pieces in the vocabulary (Llama 2: 32000).",
        "format": FORMAT_HELP,
        "field": "Text field of JSONL input [default: text].",
        "character_coverage": "Share of characters covered by pieces; the rarest fall back to bytes.",
        "max_sentence_length": "Lines longer than this many bytes are left out of training.",
        "threads": "Trainer threads (0: all cores).",
    },
)

config_command(
    "encode",
    "tokenize",
    "EncodeConfig",
    'Text or JSONL to {"tokens": [...]} JSONL (other fields passed through), to token shards for pretrain '
    '(--out), or chat dialogs {"messages": [...]} to {"tokens", "mask"} in Llama 2\'s chat format (--chat).',
    short={"output": "-o", "tokenizer": "-t"},
    arguments=("inputs",),
    entry="run_encode",
    group=tokenize_app,
    flags={
        "tokenizer": "SentencePiece model file.",
        "inputs": INPUTS_HELP,
        "output": "JSONL output; - for stdout.",
        "out": "Write safetensors token shards and index.json to this directory.",
        "format": FORMAT_HELP,
        "field": "JSONL field to encode [default: text; messages with --chat].",
        "doc_split": "Documents of text input: paragraph (default), line or file.",
        "chat": "Encode dialogs in Llama 2's chat format with a loss mask.",
        "bos": "BOS before each document [default: on].",
        "eos": "EOS after each document [default: on with --out].",
        "workers": "Encoding processes.",
        "shard_tokens": "Tokens a shard holds at least before the next starts [default: 100M].",
        "val_fraction": "Put this share of the documents (evenly spread) in a val split.",
    },
)

config_command(
    "decode",
    "tokenize",
    "DecodeConfig",
    '{"tokens": [...]} JSONL back to text, other fields passed through.',
    short={"output": "-o", "tokenizer": "-t"},
    arguments=("inputs",),
    entry="run_decode",
    group=tokenize_app,
    flags={
        "tokenizer": "SentencePiece model file.",
        "inputs": "JSONL files; - is stdin.",
        "output": "JSONL output; - for stdout.",
        "field": "Field to write the text to.",
    },
)

TRAIN_HELP = {
    "lr": "Peak learning rate (default: the paper's for this stage).",
    "min_lr_ratio": "Cosine decay floor as a fraction of the peak.",
    "weight_decay": "AdamW weight decay on matrices.",
    "grad_clip": "Clip the global gradient norm (0 = off).",
    "save_every": "Checkpoint every N steps (and at the end, and on Ctrl-C).",
    "keep": "Checkpoints kept (0 = all).",
    "log_every": "metrics.jsonl row every N steps.",
    "resume": "Continue from the run's latest checkpoint.",
    "distributed": "Under torchrun: ddp or fsdp (FSDP2 fully_shard).",
    "activation_checkpointing": "Recompute blocks in backward to save memory.",
    "compile": "torch.compile the model.",
    "seed": "Random seed.",
    "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
    "dtype": "auto (bf16 autocast where native, else fp32), fp32 or bf16.",
    "dry_run": "Build the model on the meta device, print each rank's memory (parameters, gradients, optimizer, "
    "activations) for these flags and exit.",
    "device_memory": "With --dry-run: the memory of one device (e.g. 80GB, 24GiB) to check the plan against.",
    "world_size": "With --dry-run: the processes to plan for [default: this run's; 1 outside torchrun].",
    "lora_rank": "Train LoRA adapters of this rank on the frozen model (QLoRA on a quantized one); 0 = all weights.",
    "lora_alpha": "LoRA scale numerator: adapters add (alpha / rank) B A x [default: twice the rank].",
    "lora_dropout": "Dropout on the adapters' input.",
    "lora_targets": "all, or a comma list of wq,wk,wv,wo,w1,w2,w3: the block layers that get adapters.",
    "adapter": "An adapter file on -m/--model: continued with --lora-rank (same rank and targets), else merged.",
    "tensorboard": "Also write the metrics.jsonl rows to this TensorBoard log directory (tensorboard --logdir).",
}

config_command(
    "pretrain",
    "pretrain",
    "PretrainConfig",
    "Pretrain a base model on token shards; resumable, and data-parallel under torchrun.",
    short={"output": "-o"},
    arguments=("data",),
    names={"overrides": "--set"},
    flags={
        **TRAIN_HELP,
        "data": "Token shards directory (tokenize encode --out).",
        "output": "Run directory: checkpoints, metrics.jsonl.",
        "preset": "Model preset (llama2-15m, llama2-60m, llama2-110m, llama2-1b, llama2-7b...).",
        "overrides": "Override a model field: key=value.",
        "seq_len": "Tokens per training sequence.",
        "batch_size": "Sequences per micro-batch per process.",
        "global_batch_tokens": "Tokens per optimizer step, reached by gradient accumulation.",
        "steps": "Optimizer steps in all.",
        "lr": "Peak learning rate (default: the paper's, 3e-4; 1.5e-4 for 70B).",
        "warmup": "Warmup steps (default 2000, at most a tenth of --steps).",
        "eval_every": "Validation loss every N steps (0 = never).",
        "eval_batches": "Micro-batches of the val split per evaluation.",
        **dict.fromkeys(("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter")),
    },
)

config_command(
    "sft",
    "sft",
    "SFTConfig",
    "Supervised fine-tuning on dialogs (loss on the answers only, packed rows); resumable, and under torchrun.",
    short={"model": "-m", "output": "-o"},
    flags={
        **TRAIN_HELP,
        "model": "Base model checkpoint (a language model with its tokenizer).",
        "data": 'Dialogs JSONL: {"messages": [...]}, {"prompt", "response"}, or HH text in --field.',
        "output": "Run directory: checkpoints, metrics.jsonl, model.safetensors.",
        "field": "Record field holding Anthropic HH text (or a message list), e.g. chosen.",
        "seq_len": "Tokens per training row (capped by the model's context).",
        "batch_size": "Rows per micro-batch per process.",
        "global_batch_size": "Rows per optimizer step, reached by gradient accumulation (Llama 2: 64).",
        "epochs": "Passes over the data (Llama 2: 2); --steps wins when given.",
        "steps": "Optimizer steps in all (default: from --epochs).",
        "lr": "Peak learning rate (default: Llama 2's 2e-5).",
        "warmup": "Warmup steps (default: 3% of the steps).",
        "val_fraction": "Share of the dialogs held out for validation loss.",
        "eval_every": "Validation loss every N steps (0 = at the end only).",
        "pack": "Pack dialogs into rows (attention kept inside each); --no-pack pads one dialog a row.",
        "seed": "Random seed (data order, held-out split).",
    },
)


config_command(
    "train-rm",
    "train_rm",
    "TrainRMConfig",
    "Train a helpfulness or safety reward model on preference pairs (margin ranking loss); resumable, torchrun.",
    short={"model": "-m", "output": "-o"},
    flags={
        **TRAIN_HELP,
        "model": "Initial checkpoint: a chat or base model (its head becomes a scalar one), or a reward model.",
        "data": 'Pairs JSONL: {"messages"|"prompt", "chosen", "rejected", "rating"?} or Anthropic HH pairs.',
        "output": "Run directory: checkpoints, metrics.jsonl (held-out accuracy), model.safetensors.",
        "kind": "helpfulness or safety: the reward model's kind, written in its header.",
        "margin": "Rating margin in the loss: small, large (Llama 2, Table 27) or none; unrated pairs get none.",
        "seq_len": "Most tokens of a dialog (capped by the model's context); longer ones lose their oldest turns.",
        "batch_size": "Pairs per micro-batch per process (both answers in one forward).",
        "global_batch_size": "Pairs per optimizer step, reached by gradient accumulation (Llama 2: 512).",
        "epochs": "Passes over the pairs (Llama 2: 1); --steps wins when given.",
        "steps": "Optimizer steps in all (default: from --epochs).",
        "lr": "Peak learning rate (default: Llama 2's 1e-5; 5e-6 for the 70B shape).",
        "warmup": "Warmup steps (default: 3% of the steps, at least 5).",
        "val_fraction": "Share of the pairs held out for accuracy (overall and per rating).",
        "eval_every": "Held-out accuracy every N steps (0 = at the end only).",
        "pack": "Pack a micro-batch's sequences into rows (attention kept inside each); --no-pack pads.",
        "seed": "Random seed (data order, held-out split).",
    },
)

config_command(
    "score",
    "score",
    "ScoreConfig",
    "Score answers with a reward model: dialogs JSONL in, each out with score and score_prob added.",
    short={"model": "-m", "input": "-i", "output": "-o"},
    flags={
        "model": "Reward model checkpoint (train-rm).",
        "input": 'Dialogs ending with an answer: {"messages": [...]}, {"prompt", "response"}, or HH text in --field.',
        "output": "Where the scored records go (- = stdout).",
        "field": "Record field holding Anthropic HH text (or a message list), e.g. chosen.",
        "batch_size": "Dialogs scored at once.",
        "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
        "dtype": "auto (the checkpoint's own where native), fp32, bf16 or fp16.",
        "adapter": "LoRA adapter file trained on -m/--model (one that makes a language model a reward model too).",
    },
)

config_command(
    "eval",
    "eval",
    "EvalConfig",
    "Perplexity of a language model on text or token JSONL over a sliding window (each document on its own, text "
    "with a BOS in front; a document shorter than 2 tokens has nothing to predict and is skipped); with --reference, "
    "the KL divergence from another model's next-token distributions and how often their top tokens agree. One JSON "
    "summary out.",
    short={"model": "-m", "output": "-o"},
    flags={
        "model": "Language model checkpoint (a quantized one too).",
        "data": 'A text file (one document), or JSONL (- is stdin): a record a document, {"tokens": [...]} or text '
        "in --field.",
        "reference": "Model to compare with on the same windows (same tokenizer): KL(P_ref || P_model), same top "
        "token, and its own perplexity.",
        "output": "Where the summary JSON goes (- = stdout).",
        "format": FORMAT_HELP,
        "field": "Text field of JSONL records [default: text]; a record with 'tokens' is read as ids.",
        "context": "Tokens a window holds [default: the model's context; the shorter one's with --reference].",
        "stride": "Tokens from one window's start to the next [default: the context: disjoint windows]. A window "
        "scores only tokens no earlier window scored, never its own first, so with a smaller stride every token after "
        "the first window has at least context - stride tokens of history.",
        "batch_size": "Windows per forward pass.",
        "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
        "dtype": "auto (the checkpoint's own where native), fp32, bf16 or fp16.",
        "adapter": ADAPTER_HELP,
        "reference_adapter": "LoRA adapter file trained on --reference, applied to it.",
    },
)

config_command(
    "quantize",
    "quantize",
    "QuantizeConfig",
    "Quantize a checkpoint's linear layers to int8 or int4 (GPTQ with --calibration); every command loads the result.",
    short={"model": "-m", "output": "-o"},
    flags={
        "model": "Floating-point checkpoint (a language or reward model).",
        "output": "The quantized checkpoint to write (.safetensors).",
        "scheme": "int8 (symmetric, per output channel) or int4 (asymmetric, per group of inputs).",
        "group_size": "int4: inputs per scale and zero point, 32, 64 or 128 [default: 128].",
        "head": "Quantize the output layer too (a language model's untied head).",
        "calibration": "Text, JSONL text or token JSONL for GPTQ to correct rounding on (else round to nearest).",
        "calibration_format": "auto (.jsonl files and stdin are JSONL, other files text), text or jsonl.",
        "calibration_field": "Text field of calibration JSONL records [default: text] (records with tokens use those).",
        "calibration_samples": "Calibration sequences GPTQ sees.",
        "calibration_len": "Tokens per calibration sequence [default: 512, or the model's context if shorter].",
        "damp": "GPTQ's damping: this fraction of the mean of diag(X^T X) added to its diagonal.",
        "seed": "Seed drawing the calibration sequences.",
        "device": "Where GPTQ runs: auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
        "shard_size": "Split the output into shards above this size (index + shards, as Hugging Face's layout).",
        "adapter": "LoRA adapter file trained on -m/--model: quantize the model with it merged in.",
    },
)

config_command(
    "rejection-sample",
    "rejection_sample",
    "RejectionSampleConfig",
    "Rejection sampling: K answers per prompt (prompt prefilled once, its cache forked), the best under the reward "
    "models (Llama 2's safety/helpfulness hybrid) appended to messages, ready for sft; torchrun shards prompts.",
    short={"model": "-m", "input": "-i", "output": "-o"},
    names={"k": "-k"},
    flags={
        "model": "Policy checkpoint: the chat model that answers (with its tokenizer).",
        "rm": "Helpfulness reward model (train-rm), with the policy's tokenizer.",
        "safety_rm": "Safety reward model: R_c is its score for is_safety prompts and answers it finds unsafe.",
        "input": 'Prompts JSONL: {"messages": [...]} ending with a user turn, or {"prompt": ...}; - = stdin.',
        "output": "Where the chosen dialogs go, with score and scores (- = stdout).",
        "k": "Answers sampled per prompt.",
        "keep": "best (one dialog per prompt) or all (every sample with its score).",
        "pool": "Earlier outputs: per prompt, keep the best of those and this run's (prompts must match).",
        "max_new_tokens": "Most tokens of one answer.",
        "temperature": "Sampling temperature (Llama 2 raises it over iterations; 0 = greedy).",
        "top_p": "Nucleus sampling mass (1 = off).",
        "batch_size": "Prompts sampled at once (batch-size x k rows decode together).",
        "seed": "Random seed (rank r of torchrun uses seed + r).",
        "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
        "dtype": "auto (the checkpoint's own where native), fp32, bf16 or fp16.",
        "adapter": "LoRA adapter file trained on the policy -m/--model, applied to it.",
        "rm_adapter": "LoRA adapter file trained on --rm (or one making a language model a reward model).",
        "safety_rm_adapter": "LoRA adapter file trained on --safety-rm.",
        "timings": TIMINGS_HELP,
        "compile": COMPILE_HELP,
    },
)

config_command(
    "compare",
    "compare",
    "CompareConfig",
    "Win rate of model A against model B judged by a reward model (Llama 2's Figure 11): wins, ties, losses, a "
    "Wilson 95% interval, per-category rows; violation rates with --safety-rm. One JSON summary out.",
    short={"model_a": "-a", "model_b": "-b", "input": "-i", "output": "-o"},
    flags={
        "model_a": "Chat model A (with its tokenizer).",
        "model_b": "Chat model B (the same tokenizer).",
        "rm": "Helpfulness reward model (train-rm), with the models' tokenizer.",
        "safety_rm": "Safety reward model: judge by the hybrid rule, and report each model's violation rate.",
        "input": 'Prompts JSONL: {"messages": [...]} ending with a user turn, or {"prompt": ...}; - = stdin.',
        "output": "Where the JSON summary goes (- = stdout).",
        "keep": "Also write both answers and both scores of every prompt to this JSONL file.",
        "tie_margin": "Scores closer than or equal to this are a tie (0: only equal scores).",
        "max_new_tokens": "Most tokens of one answer.",
        "temperature": "Sampling temperature (0 = greedy; Meta's chat default 0.6).",
        "top_p": "Nucleus sampling mass (Meta's chat default 0.9).",
        "batch_size": "Prompts answered at once by each model.",
        "seed": "Random seed (each model samples with its own generator from it).",
        "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
        "dtype": "auto (the checkpoint's own where native), fp32, bf16 or fp16.",
        "adapter_a": "LoRA adapter file trained on model A, applied to it (A may be B with an adapter).",
        "adapter_b": "LoRA adapter file trained on model B, applied to it.",
        "rm_adapter": "LoRA adapter file trained on --rm (or one making a language model a reward model).",
        "safety_rm_adapter": "LoRA adapter file trained on --safety-rm.",
        "timings": TIMINGS_HELP,
        "compile": COMPILE_HELP,
    },
)


config_command(
    "ppo",
    "ppo",
    "PPOConfig",
    "RLHF by PPO against the hybrid safety/helpfulness reward with a KL penalty; resumable, and under torchrun.",
    short={"model": "-m", "output": "-o"},
    flags={
        **TRAIN_HELP,
        "model": "Policy to start from (a chat model: sft or rejection-sampling output).",
        "rm": "Helpfulness reward model (train-rm); the value model starts from it.",
        "safety_rm": "Safety reward model: its score decides on safety prompts and where sigmoid(score) < 0.15.",
        "rm_adapter": "An adapter on --rm (the value model starts from the reward model it makes).",
        "safety_rm_adapter": "An adapter on --safety-rm.",
        "prompts": 'Prompts JSONL: {"messages": [... ending with the user]} or {"prompt": text}; "is_safety" optional.',
        "output": "Run directory: checkpoints, metrics.jsonl (a row per step, the iteration's figures on its last).",
        "iterations": "PPO iterations (each: sample, score, one gradient step per minibatch).",
        "prompts_per_iteration": "Samples per iteration, one per prompt (Llama 2: 512).",
        "minibatch_size": "Samples per gradient step (Llama 2: 64).",
        "batch_size": "Samples per micro-batch per process (a minibatch is reached by accumulation).",
        "max_new_tokens": "Most tokens of an answer.",
        "temperature": "Sampling temperature (1 = the policy's own distribution, what the PPO ratio assumes).",
        "top_p": "Nucleus sampling mass (1 = off, on-policy).",
        "lr": "Learning rate, constant (default: Llama 2's 1e-6).",
        "kl_beta": "KL penalty per token (default: Llama 2's 0.01; 0.005 above 30B parameters).",
        "clip": "PPO clip range of the probability ratio (and of the value change).",
        "gamma": "Discount of GAE.",
        "lam": "Lambda of GAE.",
        "value_coef": "Weight of the value loss.",
        "gen_batch_size": "Prompts generated and scored at once.",
        "compile_decode": "The rollouts' decode step compiled (--compile compiles the training step): "
        + COMPILE_HELP.split(": ", 1)[1],
        "save_every": "Checkpoint every N iterations (and at the end, and on Ctrl-C after the iteration).",
        "eval_every": None,  # ppo's figures are logged every iteration
        "warmup": None,  # a constant learning rate, as Llama 2's PPO
        "min_lr_ratio": None,
        "seed": "Random seed (prompt order, sampling).",
    },
)


SAMPLING_HELP = {
    "max_new_tokens": "Most new tokens.",
    "temperature": "Sampling temperature (0 = greedy; Meta's chat default 0.6).",
    "top_p": "Nucleus sampling mass (Meta's chat default 0.9).",
    "batch_size": "Dialogs answered at once.",
    "seed": "Random seed.",
    "device": "auto (cuda if present, else cpu), cpu, cuda or cuda:N.",
    "dtype": "auto (the checkpoint's own where native), fp32, bf16 or fp16.",
    "timings": TIMINGS_HELP,
    "compile": COMPILE_HELP,
}

config_command(
    "generate",
    "generate",
    "GenerateConfig",
    'Complete prompts from JSONL ({"prompt": ...} or {"tokens": [...]}) to JSONL, batched.',
    short={"model": "-m", "input": "-i", "output": "-o"},
    flags={
        **SAMPLING_HELP,
        "model": "llamactl checkpoint (.safetensors or index).",
        "input": "JSONL prompts; - for stdin.",
        "output": "JSONL results; - for stdout.",
        "max_new_tokens": "Tokens to generate at most.",
        "temperature": "0 means greedy.",
        "top_p": "Nucleus sampling mass (1 = off).",
        "top_k": "Keep the k most likely tokens (0 = off).",
        "batch_size": "Prompts decoded together.",
        "logprobs": "Add the log-probability of each new token.",
        "adapter": ADAPTER_HELP,
    },
)

config_command(
    "chat",
    "chat",
    "ChatConfig",
    "Chat with a model on a terminal (streaming, /retry /undo /clear /system /save /help), or answer dialogs "
    "JSONL from stdin (not a terminal, or --batch).",
    short={"model": "-m", "input": "-i", "output": "-o"},
    flags={
        "model": "Chat model checkpoint (with its tokenizer).",
        "system": "System prompt.",
        "load": "Continue the (last) dialog of this JSONL file (what /save writes).",
        "batch": 'JSONL mode even on a terminal: {"messages": [...]} in, the answer appended out.',
        "input": "Dialogs JSONL to answer (batch mode; - = stdin).",
        "output": "Where answered dialogs go (batch mode; - = stdout).",
        **SAMPLING_HELP,
        "max_new_tokens": "Most tokens of one answer.",
        "adapter": ADAPTER_HELP,
    },
)

config_command(
    "gatt-augment",
    "gatt_augment",
    "GattConfig",
    "Ghost Attention dialogs: attach an instruction to every user turn; with -m answer each turn with the model and "
    "write training examples (instruction only in the first turn, earlier turns loss-free); --finalize does that "
    "last step for dialogs sampled elsewhere.",
    short={"model": "-m", "input": "-i", "output": "-o"},
    flags={
        "input": "Dialogs JSONL (- = stdin).",
        "output": "Where the dialogs go (- = stdout).",
        "field": "Record field holding Anthropic HH text (or a message list), e.g. chosen.",
        "instructions": 'Instructions, JSONL {"instruction": ...} or one a line (default: built-in, seeded).',
        "finalize": "Turn sampled dialogs (with gatt_instruction) into training examples.",
        "model": "Chat model that answers every turn (prepare, sample and finalize in one go).",
        "adapter": ADAPTER_HELP,
        **SAMPLING_HELP,
        "max_new_tokens": "Most tokens of one sampled answer.",
        "seed": "Random seed (instruction choice and sampling).",
    },
)


def main(argv: list[str] | None = None) -> None:
    """The entry point: usage errors are one line too (typer's Usage / Try / Error block is three)."""
    import errno

    from llamactl.files import interrupt_on_signals, os_reason

    interrupt_on_signals()
    exceptions = _click().exceptions
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="llamactl", standalone_mode=False)
    except exceptions.NoArgsIsHelpError as e:  # no arguments at all: the help is the answer
        e.show()
        code = e.exit_code
    except exceptions.UsageError as e:
        _error(e.format_message(), e.ctx.command_path if e.ctx is not None else "llamactl")
        code = 2
    except typer.Abort:  # end of input while parsing
        _error("unexpected end of input", "llamactl")
        code = 2
    try:
        sys.stdout.flush()
    except OSError as e:
        _quiet_stdout()
        if e.errno != errno.EPIPE and not code:
            _error(f"<stdout>: cannot write ({os_reason(e)})", "llamactl")
            code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
