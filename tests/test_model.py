"""The model core against transformers' LlamaForCausalLM, through the real converter."""

import pytest
import torch

from llamactl.commands.convert import ConvertConfig, run
from llamactl.generate import SamplingParams, generate
from llamactl.loading import load_model
from llamactl.model import PRESETS, ModelArgs, Transformer, preset


def test_meta_presets_match_params_json():
    # Meta's published sizes: 6.74B, 13.0B, 69.0B parameters; FFN hidden sizes 11008, 13824, 28672.
    assert [preset(n).hidden_dim for n in ("llama2-7b", "llama2-13b", "llama2-70b")] == [11008, 13824, 28672]
    assert round(preset("llama2-7b").num_params() / 1e9, 2) == 6.74
    assert round(preset("llama2-13b").num_params() / 1e9, 2) == 13.02
    assert round(preset("llama2-70b").num_params() / 1e9, 1) == 69.0
    assert preset("llama2-70b").n_kv_heads == 8


def test_small_preset_names_say_their_size():
    for name in PRESETS:
        if name.endswith("m"):
            millions = preset(name).num_params() / 1e6
            assert abs(millions - int(name.split("-")[1][:-1])) / millions < 0.05, (name, millions)


def test_num_params_matches_module():
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=16, max_seq_len=32)
    for head, tie in (("lm", False), ("lm", True), ("scalar", False)):
        a = ModelArgs(**{**args.to_dict(), "head": head, "tie_embeddings": tie})
        assert a.num_params() == sum(p.numel() for p in Transformer(a).parameters())


def test_logits_and_greedy_equal_transformers(hf_model_dir, tmp_path):
    path, hf = hf_model_dir
    out = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=path, output=out))
    model, _ = load_model(out)
    tokens = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    prompts = [[1, 5, 9, 33], [1, 7], [1, 100, 3, 4, 5, 6, 7]]  # different lengths: batched right-padded
    got = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0), eos_id=None)
    for p, g in zip(prompts, got, strict=True):
        want = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert p + g.tokens == want[0].tolist()
        assert g.finish_reason == "length"


def test_training_loss_equals_transformers(hf_model_dir, tmp_path):
    path, hf = hf_model_dir
    out = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=path, output=out))
    model, _ = load_model(out)
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    ref = hf(tokens[:, :-1], labels=None).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, 128), tokens[:, 1:].reshape(-1))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    from llamactl.convert import llamactl_to_hf_name, permute_to_hf

    theirs = dict(hf.named_parameters())
    args = model.args
    for name, p in model.named_parameters():  # every parameter's gradient, in transformers' layout
        heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads if name.endswith("wk.weight") else 0
        ours = permute_to_hf(p.grad, heads) if heads else p.grad
        torch.testing.assert_close(ours, theirs[llamactl_to_hf_name(name)].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
    model = Transformer(args).eval()
    model.init_weights(0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    got = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0), eos_id=None)
    for p, g in zip(prompts, got, strict=True):
        seq = list(p)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq == p + g.tokens


def test_segment_ids_isolate_packed_sequences():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32)
    model = Transformer(args).eval()
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, positions=pos, segment_ids=seg)
        torch.testing.assert_close(out[:, :5], model(a))
        torch.testing.assert_close(out[:, 5:], model(b))


def test_bf16_autocast_loss_tracks_fp32_and_reaches_master_weights():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(0)
    tokens = torch.randint(0, 300, (2, 33))
    ref = model(tokens[:, :-1], tokens[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits of size ~1 carry errors ~1e-2, the mean loss far less
    assert abs(loss.item() - ref.item()) < 2e-2
    assert model.output.weight.grad.dtype == torch.float32 and model.output.weight.grad.abs().sum() > 0


def _tiny(head: str = "lm") -> Transformer:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=32)
    model = Transformer(ModelArgs(**{**args.to_dict(), "head": head}))
    model.init_weights(0)
    return model


def test_forward_outputs_against_full_logits():
    """loss, loss_sum and logprobs, computed from hidden states without full logits, against log_softmax of the
    full logits written out here; masked and -100 targets excluded."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 50, (3, 9), generator=g), torch.randint(0, 50, (3, 9), generator=g)
    targets[0, :4] = -100
    mask = torch.rand(3, 9, generator=g) > 0.4
    logp = torch.log_softmax(model(tokens, output="logits").double(), -1)
    keep = (targets != -100) & mask
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    total, count = model(tokens, targets, mask, output="loss_sum")
    assert count.item() == keep.sum().item()
    torch.testing.assert_close(total.double(), -picked.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(tokens, targets, mask).double(), -picked.sum() / keep.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(tokens, targets, mask, output="logprobs").double(), picked, rtol=1e-5, atol=1e-5)


def test_forward_refuses_outputs_the_head_lacks():
    lm, rm = _tiny("lm"), _tiny("scalar")
    tokens = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match="scalar-head \\(reward\\) model has no 'loss' output"):
        rm(tokens, tokens)
    with pytest.raises(ValueError, match="a language model has no 'scores' output"):
        lm(tokens, output="scores")
    with pytest.raises(ValueError, match="output 'logprobs' needs targets"):
        lm(tokens, output="logprobs")
    assert rm(tokens).shape == (1, 5)
