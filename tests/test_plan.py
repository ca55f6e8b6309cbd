"""The planner on paper, against Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM"), whose GPT models are GPT-2 shaped (vocab 51,200,
sequence 2,048), and against memory measured on real CPU ranks."""

import pytest
from transformers import GPT2Config

from models.flops import flops_per_token, head_flops_per_token
from train.plan import layer_parameters


def narayanan_gpt(layers: int, hidden: int, heads: int) -> GPT2Config:
    return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=2048, vocab_size=51200)


@pytest.mark.parametrize(
    "layers,hidden,heads,billions",
    [(24, 2304, 24, 1.7), (48, 8192, 64, 39.1), (80, 12288, 96, 145.6), (128, 25600, 160, 1008.0)],  # fmt: skip
)
def test_parameter_counts_equal_table_1(layers, hidden, heads, billions):
    counts = layer_parameters(narayanan_gpt(layers, hidden, heads))
    parameters = sum(counts[:-1])  # the last entry is the tied head's copy of the embedding
    assert parameters / 1e9 == pytest.approx(billions, abs=0.05)


def test_flops_per_iteration_equal_equation_3():
    """F = 96 B s l h^2 (1 + s/6h + V/16lh) counts one extra forward of the blocks for activation
    recomputation; our model FLOPs leave recomputation out (as MFU must), so 4/3 of our blocks' share."""
    config, batch, s = narayanan_gpt(80, 12288, 96), 2304, 2048
    l, h, v = config.n_layer, config.n_embd, config.vocab_size  # noqa: E741
    theirs = 96 * batch * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    head = head_flops_per_token(config)
    ours = ((flops_per_token(config, s) - head) * 4 / 3 + head) * batch * s
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_gpt3_175b_end_to_end_time_is_34_days():
    """Section 5.1: GPT-3 175B on 300 billion tokens, 1024 A100s at 140 TFLOP/s each: about 34 days."""
    config = narayanan_gpt(96, 12288, 96)
    head = head_flops_per_token(config)
    with_recomputation = (flops_per_token(config, 2048) - head) * 4 / 3 + head
    days = 300e9 * with_recomputation / (1024 * 140e12) / 86400
    assert days == pytest.approx(34, rel=0.05)
