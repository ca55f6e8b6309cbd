"""Model FLOPs: per trained token for MFU, and per pipeline layer for a compute-balanced partition.

Per trained token (forward + backward), after Chowdhery et al. 2022 (PaLM), appendix B:

    6 * N + 12 * n_layer * (heads * head_dim) * seq_len

N counts the parameters that take part in matrix multiplies, read off the model itself: every weight
matrix of the decoder layers (so GQA's narrower k/v projections and a three-matrix SwiGLU MLP count as
they are) and the LM head, vocab x d_model, tied or not; position embeddings and the token lookup do
no FLOPs. The second term is attention's QK^T and AV, counted for the full (not causally halved) matrix.
"""

from models.architecture import DECODER, HEAD, TIED_HEAD, Architecture
from models.deepspeed_internals import balanced_partition


def block_flops_per_token(arch: Architecture, seq_len: int, index: int = 0) -> float:
    layer = arch.meta_model().get_submodule(arch.layer_path(index))
    matmul_params = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
    return 6 * matmul_params + 12 * arch.attention_width * seq_len


def head_flops_per_token(arch: Architecture) -> float:
    return 6 * arch.config.vocab_size * arch.hidden_size


def layer_flops(arch: Architecture, seq_len: int, token_weight: bool = True) -> list[float]:
    """Forward + backward FLOPs per token of each pipeline layer (`Architecture.pipeline_layers`).

    The embedding and final norm do element-wise work only. For partitioning they get a token weight
    (`token_weight`), so that a stage is never left without a layer; for MFU they count 0.
    """
    small = 1e-3 * block_flops_per_token(arch, seq_len) if token_weight else 0.0
    costs = {
        DECODER: lambda layer: block_flops_per_token(arch, seq_len, layer.decoder_index),
        HEAD: lambda layer: head_flops_per_token(arch),
        TIED_HEAD: lambda layer: head_flops_per_token(arch),
    }
    return [costs.get(layer.kind, lambda layer: small)(layer) for layer in arch.pipeline_layers()]


def flops_per_token(arch: Architecture, seq_len: int) -> float:
    return sum(layer_flops(arch, seq_len, token_weight=False))


def flops_partition(arch: Architecture, seq_len: int, stages: int) -> list[int]:
    """Stage bounds over the pipeline layers that balance `layer_flops`, keeping the final norm with the
    head: a last stage holding only a tied head has no parameters of its own, and DeepSpeed 0.19.8 then
    deadlocks in its first step (mismatched gradient collectives)."""
    costs = layer_flops(arch, seq_len)
    merged = [*costs[:-2], costs[-2] + costs[-1]]
    bounds = balanced_partition(merged, stages)
    bounds[-1] += 1
    return bounds
