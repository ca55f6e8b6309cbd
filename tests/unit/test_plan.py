"""The planner on paper, against Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM"), whose GPT models are GPT-2 shaped (vocab 51,200,
sequence 2,048), and against memory measured on real CPU ranks."""

import json
from fractions import Fraction

import pytest
import torch
from transformers import CONFIG_MAPPING, GPT2Config

from models.architecture import DECODER, Architecture, discover
from models.flops import active_parameters, block_flops_per_token, flops_per_token, head_flops_per_token
from models.lora import AdapterPlan, plan_adapters
from models.lora_targets import lora_config, lora_targets
from models.presets import PRESETS, resolve_model_config
from tests.cases import CASES, MOE_CASES
from tests.helpers import ds_config, tiny_llama
from train.planning.activations import _saved_bytes, decoder_saved_bytes, layer_lora, saved_bytes
from train.planning.memory_model import plan_stages


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


# The model cards' counts (billions), total and active per token, with how each card counts: a figure cut after its
# last digit ("truncated": Qwen's 3.353B active is "3.3B", GLM's 106.85B total "106B") or rounded, and what its
# active count leaves out. gpt-oss counts the unembedding but not the embedding lookup (OpenAI's card: 3.61B of
# 20.91B, 5.13B of 116.83B); DeepSeek-V3's 37B is the same convention (36.6B; with the lookup, 37.6B would be "38B");
# GLM-4.5-Air's 12B holds with or without the head (12.2B / 12.8B, truncated), tested like gpt-oss. The totals are
# of the model transformers builds: without the multi-token-prediction layer the Hub's DeepSeek-V3 (685B) and
# GLM-4.5-Air (110B) files add.
MOE_CARDS = {
    "qwen3-30b-a3b": (30.5, 3.3, 0.1, "truncated", False),
    "qwen3-235b-a22b": (235, 22, 1, "truncated", False),
    "mixtral-8x7b": (46.7, 12.9, 0.1, "rounded", False),
    "gpt-oss-20b": (20.91, 3.61, 0.01, "rounded", True),
    "gpt-oss-120b": (116.83, 5.13, 0.01, "rounded", True),
    "deepseek-v3": (671, 37, 1, "rounded", True),
    "glm-4.5-air": (106, 12, 1, "truncated", True),
    "olmoe-1b-7b": (6.9, 1.3, 0.1, "rounded", False),
}


def _as_published(billions: float, figure: float, unit: float, rounding: str) -> bool:
    if rounding == "truncated":
        return figure - 1e-9 <= billions < figure + unit
    return abs(billions - figure) <= unit / 2


@pytest.mark.parametrize("preset", MOE_CARDS)
def test_moe_presets_have_the_model_cards_total_and_active_parameters(preset):
    """Total: every expert (what memory holds); active: the routed experts a token runs (top-k of them), the shared
    experts, routers, attention and dense layers, counted as the card counts."""
    total, active, unit, rounding, without_lookup = MOE_CARDS[preset]
    arch = discover(resolve_model_config(preset, None, None))
    lookup = arch.config.vocab_size * arch.hidden_size if without_lookup else 0
    assert _as_published(arch.parameters() / 1e9, total, unit, rounding), arch.parameters()
    assert _as_published((active_parameters(arch) - lookup) / 1e9, active, unit, rounding), active_parameters(arch)


def test_moe_flops_count_the_active_experts_and_the_router():
    """Qwen3-30B-A3B: q 32 x 128 and o, k and v 4 x 128 wide; 8 of 128 experts of three d x 768 matrices; the
    router d x 128. MFU divides by these FLOPs (train/build.py passes flops_per_token to the meter)."""
    arch = discover(resolve_model_config("qwen3-30b-a3b", None, None))
    d, q, kv, experts, top_k, inner, v, s = 2048, 32 * 128, 4 * 128, 128, 8, 768, 151936, 4096
    block = 6 * (2 * d * q + 2 * d * kv + top_k * 3 * d * inner + experts * d) + 12 * q * s
    assert flops_per_token(arch, s) == 48 * block + 6 * v * d


def test_mla_flops_and_the_dense_layers_that_pull_flops_and_memory_apart():
    """DeepSeek-V3's MLA matrices as they are (q through a 1536 rank, k/v through 512 + 64 rope channels), its
    attention width 128 heads x (192 + 128) / 2; layer 0 is dense (a d x 18432 SwiGLU), layer 3 runs 8 of 256 routed
    experts and a shared one. The dense layer has ~1/20 of the MoE layer's weights for about its FLOPs."""
    arch = discover(resolve_model_config("deepseek-v3", None, None))
    d, heads, s = 7168, 128, 4096
    mla = d * 1536 + 1536 * heads * 192 + d * (512 + 64) + 512 * heads * (128 + 128) + heads * 128 * d
    attention = 12 * heads * (192 + 128) / 2 * s
    assert arch.attention_width == heads * 160
    dense, moe = (block_flops_per_token(arch, s, i) for i in (0, 3))
    assert dense == 6 * (mla + 3 * d * 18432) + attention
    assert moe == 6 * (mla + (8 + 1) * 3 * d * 2048 + 256 * d) + attention
    weights = arch.layer_parameters()
    assert weights[1] / weights[4] < 1 / 19 and 0.9 < dense / moe < 1.1


@pytest.mark.parametrize("family,index", [("qwen3_moe", 0), ("qwen3_moe", 1), ("gpt_oss", 1)])
def test_moe_activations_extrapolate_exactly_from_the_narrow_copies(family, index):
    """The bytes a full-width MoE layer saves for 96 tokens, measured, against the planner's count from narrow copies
    at 32, 64 and 128 tokens: Qwen3-MoE's dense layer 0 and MoE layer 1 (each counted apart), gpt-oss's eager
    attention (its [heads, s, s] probabilities)."""
    config = next(CONFIG_MAPPING[f](**settings) for f, _, settings in MOE_CASES if f == family)
    arch = discover(config)
    text = json.dumps(json.loads(arch.config.to_json_string(use_diff=False)), sort_keys=True)
    measured = _saved_bytes(text, Fraction(1), 96, "fp32", None, index)
    assert saved_bytes(arch, "fp32", seq_len=96, index=index).micro_batch(96) == pytest.approx(measured, rel=1e-9)
    assert decoder_saved_bytes(arch, "fp32", 96)[index].micro_batch(96) == pytest.approx(measured, rel=1e-9)


def _case(family: str) -> Architecture:
    return discover(next(CONFIG_MAPPING[f](**settings) for f, _, settings in CASES + MOE_CASES if f == family))


def _default_lora(arch: Architecture, parameters: list[str] | None = None) -> AdapterPlan:
    """`--lora-rank 4`'s adapters: attention (all-linear on a dense model) and, by default, a MoE's fused experts."""
    modules, params = lora_targets(arch, None, parameters)
    config = lora_config(
        rank=4, alpha=8, dropout=0.0, target_modules=modules, base_model=None, target_parameters=params
    )
    return plan_adapters(arch, config)


def _expert_stack_bytes(arch: Architecture, index: int) -> int:
    """fp32 bytes of decoder layer `index`'s fused expert weights (its 3-D parameters: [experts, out, in])."""
    layer = arch.meta_model().get_submodule(arch.layer_path(index))
    return 4 * sum(p.numel() for p in layer.parameters() if p.ndim == 3)


@pytest.mark.parametrize("family,index", [("qwen3_moe", 1), ("llama", 0)])
def test_lora_activations_extrapolate_exactly_with_the_adapted_expert_stacks_once_per_forward(family, index):
    """With the default adapters, peft 0.21's ParamWrapper forms W + scale B A of each fused expert weight in every
    forward and the experts' matmul keeps it: a constant per micro-batch that grows with the width squared. The
    planner's count from narrow copies equals the bytes measured on the full-width layer (96 tokens), and its constant
    is the attention-only adapters' constant plus exactly those stacks' bytes. A dense layer (llama, all-linear LoRA)
    keeps nothing whatever the token count: its count stays per token."""
    arch = _case(family)
    adapters = _default_lora(arch)
    text = json.dumps(json.loads(arch.config.to_json_string(use_diff=False)), sort_keys=True)
    lora = json.dumps(layer_lora(arch, adapters, index), sort_keys=True)
    measured = _saved_bytes(text, Fraction(1), 96, "fp32", lora, index)
    planned = saved_bytes(arch, "fp32", adapters, seq_len=96, index=index)
    assert planned.micro_batch(96) == pytest.approx(measured, rel=1e-9)
    assert decoder_saved_bytes(arch, "fp32", 96, adapters)[index] == planned
    stacks = _expert_stack_bytes(arch, index)
    attention_only = saved_bytes(arch, "fp32", _default_lora(arch, ["none"]), seq_len=96, index=index)
    assert planned.constant == pytest.approx(attention_only.constant + stacks, rel=1e-9)
    assert (stacks > 0) == (family != "llama") and (planned.constant == 0) == (family == "llama")


@pytest.mark.parametrize("checkpoint", [0, 1])
def test_the_adapted_expert_stacks_are_held_once_when_recomputed_and_per_micro_batch_otherwise(checkpoint):
    """Two stages, 4 micro-batches of 2 x 32 tokens: 1F1B keeps min(p - s, m) = 2 in flight on stage 0. Without
    checkpointing each keeps its blocks' full sets (each its own W + BA copies); with it, each keeps its blocks'
    inputs and one block's full set (its constant once) is rebuilt at a time."""
    arch = _case("qwen3_moe")
    adapters, seq, micro = _default_lora(arch), 32, 2
    plans = plan_stages(
        arch,
        ds_config(8, micro),
        stages=2,
        data_parallel=1,
        seq_len=seq,
        method="flops",
        checkpoint_interval=checkpoint,
        adapters=adapters,
    )
    saved = decoder_saved_bytes(arch, "fp32", seq, adapters)
    layers = arch.pipeline_layers()
    blocks = [saved[layers[i].decoder_index] for i in range(*plans[0].bounds[0]) if layers[i].kind == DECODER]
    assert len(blocks) >= 2 and max(b.constant for b in blocks) >= _expert_stack_bytes(arch, 1) > 0
    full = [b.micro_batch(micro * seq) for b in blocks]
    inputs = micro * seq * arch.hidden_size * 4
    expected = 2 * len(blocks) * inputs + max(full) if checkpoint else 2 * sum(full)
    assert plans[0].memory["activations"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "dtype,micro,seq,micro_batches,lora",
    [
        ("fp32", 2, 32, 4, False),  # log_softmax's backward: two fp32 [64 tokens, V] gradients > the [V, 64] weight's
        ("fp32", 1, 4, 4, False),  # the head's [V, 64] weight gradient > two fp32 [4 tokens, V] gradients
        ("bf16", 1, 4, 4, True),  # LoRA: the head's weight is frozen, no weight gradient
        ("fp32", 2, 32, 1, False),  # one micro-batch: one output buffer used, its weight gradient becomes `.grad`
    ],
)
def test_the_last_stage_holds_the_loss_path_and_the_logits_deepspeed_keeps(dtype, micro, seq, micro_batches, lora):
    """A tied Llama (vocabulary 4,096, h = 64) on 2 stages under 1F1B, from the shapes: the last stage keeps, per
    micro-batch in flight (one), its blocks' saved tensors, the logits (w bytes) and the fp32 log-softmax; once, the
    larger of the loss's two fp32 gradients and the head's weight gradient (full fine-tuning, from the second
    micro-batch on); and the other output buffer's logits. In the optimizer step DeepSpeed's two buffers hold the
    last two micro-batches' logits (`kept_logits`); the first stage keeps none."""
    arch = discover(CONFIG_MAPPING["llama"](**tiny_llama(vocab_size=4096, tie_word_embeddings=True)))
    ds = ds_config(micro * micro_batches, micro, bf16={"enabled": dtype == "bf16"})
    adapters = _default_lora(arch) if lora else None
    plans = plan_stages(arch, ds, stages=2, data_parallel=1, seq_len=seq, method="flops", adapters=adapters)
    width, tokens, vocab, hidden = (2 if dtype == "bf16" else 4), micro * seq, 4096, 64
    saved, layers = decoder_saved_bytes(arch, dtype, seq, adapters), arch.pipeline_layers()
    last = range(*plans[1].bounds[0])
    blocks = sum(saved[layers[i].decoder_index].micro_batch(tokens) for i in last if layers[i].kind == DECODER)
    weight_gradient = vocab * hidden * width if not lora and micro_batches > 1 else 0
    kept = min(2, micro_batches)
    expected = (
        blocks
        + tokens * vocab * (width + 4)
        + max(8 * tokens * vocab, weight_gradient)
        + (kept - 1) * tokens * vocab * width
    )
    assert plans[1].memory["activations"] == pytest.approx(expected, rel=1e-12)
    assert plans[1].memory["kept_logits"] == kept * tokens * vocab * width and plans[0].memory["kept_logits"] == 0
    m = plans[1].memory
    step = m["weights"] + m["optimizer"] + m["reduction"] + m["step_gradients"] + m["kept_logits"]
    assert plans[1].peak >= step and (seq == 4 and not lora) == (weight_gradient > 8 * tokens * vocab)
