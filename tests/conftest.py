import pytest
import torch
from helpers import tiny_hf_config


@pytest.fixture
def hf_model_dir(tmp_path):
    """A random GQA Llama saved by transformers itself: (directory, model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_hf_config()).eval()
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return str(path), model
