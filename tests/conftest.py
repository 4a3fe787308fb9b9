"""Shared fixtures, and the guard of the name ``kernels`` for everything the tests run.

The repository root holds ``kernels/`` (installed as ``llamactl.kernels``). ``python -m pytest`` run from the root
puts the root first on ``sys.path``, where that folder would be taken for the top-level package ``kernels`` that
transformers imports (Hugging Face's kernels): the root leaves this process's path before any test module imports
transformers, and every child the tests start (the CLI, torchrun and its ranks) runs with ``PYTHONSAFEPATH``, which
keeps the working directory and a script's folder off its path. ``tests/test_kernels_name.py`` checks both.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"  # before helpers copies the environment for the children
# --compile auto decodes eagerly in the tests (the eager step is the reference; compile tests ask for it by name)
os.environ["LLAMACTL_COMPILE"] = "never"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_hf_config  # noqa: E402


@pytest.fixture
def hf_model_dir(tmp_path):
    """A random GQA Llama saved by transformers itself: (directory, model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_hf_config()).eval()
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def stories(tmp_path_factory):
    """llama2.c's stories260K (a real tiny pretrained checkpoint, tests/fixtures) converted to a llamactl file."""
    from helpers import FIXTURES

    from llamactl.commands.convert import ConvertConfig, run

    out = str(tmp_path_factory.mktemp("stories") / "stories.safetensors")
    run(ConvertConfig(src=os.path.join(FIXTURES, "stories260K.bin"), output=out))
    return out
