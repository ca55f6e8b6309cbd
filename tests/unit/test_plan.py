"""The planner on paper, against Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM"), whose GPT models are GPT-2 shaped (vocab 51,200,
sequence 2,048), and against memory measured on real CPU ranks."""

import pytest
import torch
from transformers import GPT2Config

from models.architecture import Architecture, discover
from models.flops import flops_per_token, head_flops_per_token
from models.presets import PRESETS, resolve_model_config


def narayanan_gpt(layers: int, hidden: int, heads: int) -> Architecture:
    return discover(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=2048, vocab_size=51200))


@pytest.mark.parametrize(
    "layers,hidden,heads,billions",
    [(24, 2304, 24, 1.7), (48, 8192, 64, 39.1), (80, 12288, 96, 145.6), (128, 25600, 160, 1008.0)],
)
def test_parameter_counts_equal_table_1(layers, hidden, heads, billions):
    parameters = narayanan_gpt(layers, hidden, heads).parameters()
    assert parameters / 1e9 == pytest.approx(billions, abs=0.05)


def test_flops_per_iteration_equal_equation_3():
    """F = 96 B s l h^2 (1 + s/6h + V/16lh) counts one extra forward of the blocks for activation
    recomputation; our model FLOPs leave recomputation out (as MFU must), so 4/3 of our blocks' share."""
    config, batch, s = narayanan_gpt(80, 12288, 96), 2304, 2048
    l, h, v = config.num_layers, config.hidden_size, config.config.vocab_size  # noqa: E741
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


# Parameter counts the publishers report for these checkpoints (safetensors totals, heads included).
PUBLISHED = {
    "gpt2": 124_439_808,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "pythia-160m": 162_322_944,
    "pythia-12b": 11_846_072_320,
}


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.endswith(("-tiny", "-cpu"))])
def test_real_shape_presets_count_the_hf_models_parameters(preset):
    """What the planner counts (per pipeline layer, a tied head once) is what transformers builds from the
    preset's config on the meta device, and what the publisher reports for the checkpoint."""
    from transformers import AutoModelForCausalLM

    arch = discover(resolve_model_config(preset, None, None))
    planned = arch.parameters()
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(arch.config)
    assert planned == sum(p.numel() for p in hf.parameters())
    assert planned == PUBLISHED.get(preset, planned)


def test_llama_flops_count_gqa_swiglu_and_the_untied_head():
    """Llama-3-8B: q and o are d x d, k and v d x (8 heads x 128), the MLP three d x ff matrices."""
    arch = discover(resolve_model_config("llama-3-8b", None, None))
    d, kv, ff, v, s = 4096, 8 * 128, 14336, 128256, 2048
    block = 6 * (2 * d * d + 2 * d * kv + 3 * d * ff) + 12 * d * s
    assert flops_per_token(arch, s) == 32 * block + 6 * v * d
    assert head_flops_per_token(arch) == 6 * v * d
