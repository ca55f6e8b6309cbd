"""The pipeline on real data: GPT-2 losses equal HF's (ignored labels too); seeding makes initial weights."""

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.architecture import discover
from models.hf_weights import load_hf_weights
from models.loss import next_token_cross_entropy
from models.pipeline import build_pipeline
from train.data.examples import TEXT
from train.data.sources import resolve_sources
from train.data.splits import packed_dataset
from train.data.tokenizer import load_tokenizer

CONFIG = dict(n_layer=3, n_embd=64, n_head=4, n_positions=64)


def real_batches(corpus, tokenizer_dir, tmp_path, seq_len=32):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    splits = packed_dataset(
        resolve_sources([str(corpus)]), TEXT, tokenizer, seq_len=seq_len, val_fraction=0.1, cache_dir=tmp_path
    )
    return tokenizer, splits["train"]["input_ids"][:24].long()


def hf_and_pipeline(tokenizer, tmp_path, one_rank_group, **config):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **{**CONFIG, **config})).eval()
    hf.save_pretrained(tmp_path / "hf")
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    return hf, pipe.eval()


def test_pipeline_logits_and_loss_equal_hf(corpus, tokenizer_dir, tmp_path, one_rank_group):
    tokenizer, input_ids = real_batches(corpus, tokenizer_dir, tmp_path)
    hf, pipe = hf_and_pipeline(tokenizer, tmp_path, one_rank_group)
    with torch.no_grad():
        for batch in input_ids.split(8):
            ours = pipe(batch)
            theirs = hf(batch, labels=batch)
            assert (ours - theirs.logits).abs().max().item() <= 1e-5
            assert abs(next_token_cross_entropy(ours, batch).item() - theirs.loss.item()) <= 1e-5


def test_ignored_labels_match_hf(corpus, tokenizer_dir, tmp_path, one_rank_group):
    tokenizer, input_ids = real_batches(corpus, tokenizer_dir, tmp_path)
    hf, pipe = hf_and_pipeline(tokenizer, tmp_path, one_rank_group)
    labels = input_ids[:4].clone()
    labels[:, ::3] = -100
    with torch.no_grad():
        ours = next_token_cross_entropy(pipe(input_ids[:4]), labels).item()
        theirs = hf(input_ids[:4], labels=labels).loss.item()
    assert abs(ours - theirs) <= 1e-5


def test_initial_weights_depend_only_on_the_seed(one_rank_group):
    config = GPT2Config(vocab_size=100, **CONFIG)
    a = dict(build_pipeline(discover(config), num_stages=1, seed=7).named_parameters())
    b = dict(build_pipeline(discover(config), num_stages=1, seed=7).named_parameters())
    c = dict(build_pipeline(discover(config), num_stages=1, seed=8).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.layer.attn.c_attn.weight"], c["1.layer.attn.c_attn.weight"])


def test_layer_seeding_draws_what_torch_manual_seed_draws():
    """DeepSpeed reseeds every layer before every micro-batch; our cheap seeding (no lazy CUDA/XPU/MTIA
    seeds) must leave the CPU generator exactly where torch.manual_seed leaves it."""
    from models.pipeline import _seed_layer

    torch.manual_seed(1234 * 7 + 3)
    expected = torch.rand(5), torch.randn(3, 3)
    _seed_layer(np.int64(1234 * 7 + 3))
    assert all(torch.equal(e, d) for e, d in zip(expected, (torch.rand(5), torch.randn(3, 3)), strict=True))


def test_fused_gelu_computes_what_gpt2s_gelu_new_computes(corpus, tokenizer_dir, tmp_path, one_rank_group):
    """An imported GPT-2 checkpoint (gelu_new) runs as gelu_pytorch_tanh unless kept: same logits and loss."""
    from models.presets import resolve_model_config

    tokenizer, input_ids = real_batches(corpus, tokenizer_dir, tmp_path)
    hf, _ = hf_and_pipeline(tokenizer, tmp_path, one_rank_group, activation_function="gelu_new")
    fused = resolve_model_config(None, str(tmp_path / "hf"), None)
    kept = resolve_model_config(None, str(tmp_path / "hf"), None, fused_gelu=False)
    assert (fused.activation_function, kept.activation_function) == ("gelu_pytorch_tanh", "gelu_new")
    assert resolve_model_config("gpt2-tiny", None, 512).activation_function == "gelu_pytorch_tanh"
    arch = discover(fused)
    pipe = build_pipeline(arch, num_stages=1).eval()
    load_hf_weights(pipe, tmp_path / "hf", arch)
    with torch.no_grad():
        ours, theirs = pipe(input_ids[:8]), hf(input_ids[:8], labels=input_ids[:8])
    assert 0 < (ours - theirs.logits).abs().max().item() <= 1e-5  # not the same kernels, the same function
    assert abs(next_token_cross_entropy(ours, input_ids[:8]).item() - theirs.loss.item()) <= 1e-6
