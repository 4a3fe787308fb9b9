"""The ``llamactl`` command line: one thin typer wrapper per subcommand.

Nothing heavy is imported at module level so that ``llamactl --help`` stays instant; each wrapper imports its
command module, builds the typed config and calls ``run(cfg)``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="llamactl",
    help="The Llama 2 recipe as composable command-line stages: JSONL and safetensors in, JSONL and safetensors out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": bool(os.environ.get("LLAMACTL_DEBUG"))}

Seed = Annotated[int, typer.Option(help="Random seed.")]
Device = Annotated[str, typer.Option(help="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 where supported, else fp32), fp32, bf16 or fp16.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    if debug:
        _state["debug"] = True


def run_command(module: str, config_cls: str, **kwargs):
    """Import llamactl.commands.<module>, build its config, run it; user errors become one line and exit 2."""
    import importlib

    from llamactl.errors import UserError

    try:
        mod = importlib.import_module(f"llamactl.commands.{module}")
        cfg = getattr(mod, config_cls)(**kwargs)
        return mod.run(cfg)
    except UserError as e:
        if _state["debug"]:
            raise
        typer.secho(f"llamactl {module}: error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho(f"llamactl {module}: interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader of our stdout went away (`| head`): not an error of ours.
        sys.stderr.close()
        raise typer.Exit(0) from None


@app.command(
    help="Convert checkpoints: Meta, Hugging Face or llama2.c in; llamactl or Hugging Face out. --info describes."
)
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint file or directory.")],
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="Destination file (or directory for hf).")
    ] = None,
    info: Annotated[bool, typer.Option("--info", help="Print what SRC is (config, size, dtype, lineage).")] = False,
    src_format: Annotated[str, typer.Option("--from", help="auto, llamactl, meta, hf or llama2c.")] = "auto",
    to: Annotated[str, typer.Option("--to", help="llamactl or hf.")] = "llamactl",
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", "-t", help="SentencePiece model to attach.")] = None,
    dtype: Annotated[str, typer.Option(help="keep (as stored), fp32, bf16 or fp16.")] = "keep",
    shard_size: Annotated[str, typer.Option(help="Split llamactl output into shards above this size.")] = "5GB",
) -> None:
    run_command(
        "convert",
        "ConvertConfig",
        src=src,
        output=output,
        info=info,
        src_format=src_format,
        to=to,
        tokenizer=tokenizer,
        dtype=dtype,
        shard_size=shard_size,
        argv=sys.argv[1:],
    )


@app.command(help='Complete prompts from JSONL ({"prompt": ...} or {"tokens": [...]}) to JSONL, batched.')
def generate(
    model: Annotated[str, typer.Option("-m", "--model", help="llamactl checkpoint (.safetensors or index).")],
    input: Annotated[str, typer.Option("-i", "--input", help="JSONL prompts; - for stdin.")] = "-",
    output: Annotated[str, typer.Option("-o", "--output", help="JSONL results; - for stdout.")] = "-",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Add the log-probability of each new token.")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    run_command(
        "generate",
        "GenerateConfig",
        model=model,
        input=input,
        output=output,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        logprobs=logprobs,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
