"""Model FLOPs: per trained token for MFU, and per pipeline layer for a compute-balanced partition.

Per trained token (forward + backward), after Chowdhery et al. 2022 (PaLM), appendix B:

    6 * N + 12 * n_layer * d_model * seq_len

N counts the parameters that take part in matrix multiplies: the transformer blocks and the
(tied) LM head, vocab x d_model; position embeddings and the token lookup do no FLOPs. The
second term is attention's QK^T and AV, counted for the full (not causally halved) matrix.
"""

from transformers import GPT2Config


def block_flops_per_token(config: GPT2Config, seq_len: int) -> float:
    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    return 6 * (4 * d * d + 2 * d * inner) + 12 * d * seq_len


def head_flops_per_token(config: GPT2Config) -> float:
    return 6 * config.vocab_size * config.n_embd


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    return config.n_layer * block_flops_per_token(config, seq_len) + head_flops_per_token(config)


def layer_flops(config: GPT2Config, seq_len: int) -> list[float]:
    """Forward + backward FLOPs per token of each pipeline layer, in `gpt2_layer_specs` order.

    The embedding and final LayerNorm get a token weight (their element-wise work), so that a
    stage is never left without a layer.
    """
    small = 1e-3 * block_flops_per_token(config, seq_len)
    blocks = [block_flops_per_token(config, seq_len)] * config.n_layer
    return [small, *blocks, small, head_flops_per_token(config)]


def flops_partition(config: GPT2Config, seq_len: int, stages: int) -> list[int]:
    """Stage bounds over the pipeline layers that balance `layer_flops`, keeping the final LayerNorm
    with the head: a last stage holding only the tied head has no parameters of its own, and
    DeepSpeed 0.19.8 then deadlocks in its first step (mismatched gradient collectives)."""
    from deepspeed.runtime.utils import partition_balanced

    costs = layer_flops(config, seq_len)
    merged = [*costs[:-2], costs[-2] + costs[-1]]
    bounds = [int(b) for b in partition_balanced(merged, stages)]
    bounds[-1] += 1
    return bounds
