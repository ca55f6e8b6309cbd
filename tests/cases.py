"""Model cases and data writers that several test files share (one place, so test modules never import each
other): every family's tiny random model, the peft reference built on it, and data files of every format."""

import json
from contextlib import contextmanager

import pandas as pd
import torch
from peft import PeftModel, get_peft_model
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from models.architecture import discover
from models.flops import flops_partition
from models.hf_weights import load_hf_weights, pipeline_param_to_hf
from models.lora import add_adapters, plan_adapters, read_peft_config
from models.lora_targets import lora_config, lora_targets
from models.pipeline import CausalLMPipeline, build_pipeline, layer_specs

VOCAB, SEQ = 128, 24
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
_MOE = dict(_SHAPE, num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)
_GROUPED_SIGMOID = dict(n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1)
_YARN = {"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0}
_MOE_CASES = [
    (
        "qwen3_moe",
        "dense layers 0 and 2 (mlp_only_layers, decoder_sparse_step), normalised top-k",
        dict(num_experts=8, mlp_only_layers=[0], decoder_sparse_step=2, norm_topk_prob=True, head_dim=32),
    ),
    (
        "qwen2_moe",
        "shared expert with its sigmoid gate, qkv bias",
        dict(num_experts=8, shared_expert_intermediate_size=48),
    ),
    (
        "mixtral",
        "sliding window shorter than the block",
        dict(num_local_experts=4, intermediate_size=48, sliding_window=9),
    ),
    ("olmoe", "q/k norm", dict(num_experts=8, intermediate_size=32, eos_token_id=0, pad_token_id=0)),
    (
        "deepseek_v3",
        "MLA with q LoRA, interleaved rope, group-limited sigmoid routing, e_score_correction_bias, dense layer 0",
        dict(_MLA, **_GROUPED_SIGMOID, q_lora_rank=24, rope_interleave=True, routed_scaling_factor=2.5),
    ),
    (
        "deepseek_v2",
        "MLA without q LoRA, softmax routing, dense layer 0",
        dict(_MLA, **_GROUPED_SIGMOID, q_lora_rank=None),
    ),
    (
        "gpt_oss",
        "attention sinks (eager), alternating sliding/full layers, router and expert biases, yarn rope",
        dict(
            num_local_experts=4,
            intermediate_size=32,
            sliding_window=9,
            head_dim=16,
            rope_parameters=dict(_YARN, original_max_position_embeddings=16, truncate=False),
        ),
    ),
    (
        "glm4_moe",
        "partial rotary, q/k norm, group-limited sigmoid routing, dense layer 0",
        dict(_GROUPED_SIGMOID, use_qk_norm=True, head_dim=16),
    ),
]
# (model_type, what the case exercises, config) — every required family, tied and untied where it has both.
CASES = [
    (
        "gpt2",
        "tied, learned positions, Conv1D",
        dict(n_layer=4, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
    ),
    ("llama", "untied, GQA, llama3 rope scaling", dict(_SHAPE, num_key_value_heads=2, rope_parameters=_LLAMA3_ROPE)),
    ("llama", "tied (Llama-3.2 style)", dict(_SHAPE, num_key_value_heads=2, tie_word_embeddings=True)),
    (
        "mistral",
        "untied, GQA, sliding window shorter than the block",
        dict(_SHAPE, num_key_value_heads=2, sliding_window=9),
    ),
    ("qwen2", "tied, qkv bias", dict(_SHAPE, num_key_value_heads=2, tie_word_embeddings=True)),
    ("qwen2", "untied (Qwen2.5-7B style)", dict(_SHAPE, num_key_value_heads=2, tie_word_embeddings=False)),
    (
        "qwen2",
        "sliding window on the upper layers only (layer_types)",
        dict(_SHAPE, num_key_value_heads=2, use_sliding_window=True, sliding_window=9, max_window_layers=2),
    ),
    ("qwen3", "q/k norm, head_dim != hidden/heads", dict(_SHAPE, num_key_value_heads=2, head_dim=32)),
    ("gpt_neox", "parallel residual, partial rotary, untied embed_out", dict(_SHAPE, rotary_pct=0.25)),
    ("gpt_neox", "sequential residual", dict(_SHAPE, rotary_pct=0.5, use_parallel_residual=False)),
    (
        "phi3",
        "fused qkv and gate_up",
        dict(_SHAPE, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    ),
    ("gemma", "scaled embedding, (1 + w) RMSNorm, tied", dict(_SHAPE, num_key_value_heads=2, head_dim=16)),
    ("olmo2", "post-norms, q/k norm", dict(_SHAPE, num_key_value_heads=2, eos_token_id=0, pad_token_id=0)),
]
IDS = [f"{family}-{i}" for i, (family, _, _) in enumerate(CASES)]
# Mixtures of experts, kept apart from CASES: test_families.py runs FAMILY_CASES, the LoRA tests CASES and some
# MOE_CASES (tests/unit/test_lora.py, test_qlora.py).
MOE_CASES = [(family, f"mixture of experts: {what}", dict(_MOE, **settings)) for family, what, settings in _MOE_CASES]
FAMILY_CASES = CASES + MOE_CASES
FAMILY_IDS = [f"{family}-{i}" for i, (family, _, _) in enumerate(FAMILY_CASES)]


def hf_model(family: str, settings: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # transformers' defaults: sdpa attention (eager for gpt-oss, which has no sdpa), grouped_mm experts
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](**settings))
    with torch.no_grad():  # norms off 1, biases off 0: a swapped or skipped one must show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        persistent = model.state_dict().keys()
        for name, buffer in model.named_buffers():
            if name in persistent:  # persistent (DeepSeek's e_score_correction_bias): steers routing
                buffer.add_(torch.randn_like(buffer) * 0.1)
    return model.eval()


def load_case_weights(pipe, folder, arch) -> None:
    """The saved HF folder into the pipeline, as training loads it: every parameter and persistent buffer."""
    assert load_hf_weights(pipe, folder, arch) == len(pipe.state_dict()) > 0


def pipeline_stage(arch, stages: int, stage: int) -> CausalLMPipeline:
    """Stage `stage` of the model cut into `stages` by the `flops` partition, built in this one-rank process: the
    layers a rank of that stage builds, from the same specs, under the same global layer indices (a one-stage
    pipeline whose partition is that stage's bounds)."""
    bounds = flops_partition(arch, SEQ, stages)[stage : stage + 2]

    class OneStage(CausalLMPipeline):
        def custom_partition(self, method: str) -> list[int]:
            return bounds

    return OneStage(layers=layer_specs(arch), num_stages=1, partition_method="stage", arch=arch, seq_len=SEQ)


def peft_reference(family: str, settings: dict, folder, rank: int = 4, **lora) -> PeftModel:
    """The HF model with peft's adapters (lora_B random, not zero), saved: base in folder/base, adapter in
    folder/adapter. The targets are `--lora-rank`'s default (on a MoE: the experts' fused weights too)."""
    model = hf_model(family, settings)
    model.save_pretrained(folder / "base")
    modules, parameters = lora_targets(discover(model.config), None, None)
    config = lora_config(
        rank=rank,
        alpha=2 * rank,
        dropout=0.0,
        target_modules=modules,
        target_parameters=parameters,
        base_model=str(folder / "base"),
    )
    for key, value in lora.items():
        setattr(config, key, value)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(folder / "adapter")
    return peft_model.eval()


def pipeline_with_adapters(folder, arch, stages: int = 1, before_adapters=None, from_zero: bool = False):
    """The pipeline on folder/base with the adapters of folder/adapter; `before_adapters(pipe)`: e.g. quantize;
    `from_zero`: folder/adapter's config without its weights (`--lora-rank`'s start: lora_B zero, the base model)."""
    config, initial = read_peft_config(folder / "adapter")
    plan = plan_adapters(arch, config, None if from_zero else initial)
    pipe = build_pipeline(arch, num_stages=stages, seq_len=SEQ)
    load_hf_weights(pipe, folder / "base", arch)  # a MoE's experts stored one by one, fused as transformers does
    if before_adapters is not None:
        before_adapters(pipe)
    adapted = add_adapters(pipe, plan, seed=7)
    return pipe.eval(), plan, adapted


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


DOCS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.", "   "]


def write_all_formats(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(DOCS) + "\n")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pd.DataFrame({"text": DOCS}).to_parquet(folder / "c.parquet")
    pd.DataFrame({"text": DOCS}).to_csv(folder / "d.csv", index=False)
    return folder


def assert_gradients_equal(hf: torch.nn.Module, pipe: torch.nn.Module, arch, rel: float) -> None:
    """Every pipeline parameter's gradient is its HF parameter's (within `rel` of the largest entry), and not zero."""
    theirs = dict(hf.named_parameters())
    for name, param in pipe.named_parameters():
        expected = theirs[pipeline_param_to_hf(arch, name)].grad
        scale = expected.abs().max().item()
        assert scale > 0, name
        assert (param.grad - expected).abs().max().item() <= rel * scale, name


def experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A mixture of experts' expert blocks: their fused `gate_up_proj` is one 3-D tensor (experts x in x out)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


@contextmanager
def row_exact_experts(model: torch.nn.Module):
    """Experts through transformers' `batched_mm` for a causality check: the default `grouped_mm` (and `eager`)
    multiply each expert's tokens together, so a token routed elsewhere changes how the other rows' sums round
    (earlier logits moved by up to 6e-7 in HF's own model); `batched_mm` computes each row alone. The
    implementation is read from the config at every forward (transformers 5.24 integrations/moe.py)."""
    configs = {id(m.config): m.config for m in experts(model)}
    saved = {key: config._experts_implementation for key, config in configs.items()}
    for config in configs.values():
        config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for key, config in configs.items():
            config._experts_implementation = saved[key]
