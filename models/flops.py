"""Model FLOPs: per trained token for MFU, and per pipeline layer for a compute-balanced partition.

Per trained token (forward + backward), after Chowdhery et al. 2022 (PaLM), appendix B:

    6 * N + 12 * n_layer * attention_width * seq_len

N counts the parameters that take part in matrix multiplies, read off the model itself: every weight
matrix of the decoder layers (so GQA's narrower k/v projections, a three-matrix SwiGLU MLP and MLA's low-rank
projections count as they are) and the LM head, vocab x d_model, tied or not; position embeddings and the token
lookup do no FLOPs. The second term is attention's QK^T and AV, counted for the full (not causally halved)
matrix; `Architecture.attention_width` is heads x the mean of the query-key and value head sizes (MLA's differ).
Sliding-window layers (Mistral, Gemma 2/3's local layers) are counted as full ones (model FLOPs, as PaLM counts
them). Soft-capping (Gemma 2: tanh of every attention score and logit), Granite's multipliers and norms are
elementwise, a few FLOPs per score against 2 x head_dim per score for QK^T: left out (< 2% at head_dim 128).

**Mixtures of experts: active FLOPs.** transformers 5.24 fuses a layer's routed experts into 3-D parameters
[experts, ., .] (`mlp.experts.gate_up_proj`, `down_proj`; gpt-oss adds 2-D per-expert biases) in one experts
module; each token runs top_k of them, so their weights count top_k / experts (`num_experts_per_tok` over
the experts modules' own `num_experts`: `Architecture.experts`). Shared experts,
the router and dense layers are ordinary matrices and count whole. MFU is therefore model FLOPs of the experts a
token really runs, not of every expert.
"""

from torch import nn

from models.architecture import DECODER, HEAD, TIED_HEAD, Architecture
from models.deepspeed_internals import balanced_partition


def experts_modules(module: nn.Module) -> list[nn.Module]:
    """The modules of `module` that hold fused routed experts: a 3-D parameter of their own."""
    return [m for m in module.modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))]


def routed_fraction(arch: Architecture) -> tuple[int, int]:
    """(top_k, experts) of the model's routed experts: the share of them a token runs; (1, 1) for a dense model."""
    experts = arch.experts  # read off the experts modules (models/expert_load.py), one place for every family
    return (experts.top_k, experts.num_experts) if experts is not None else (1, 1)


def active_parameters_of(arch: Architecture, module: nn.Module, matmul_only: bool = False) -> int:
    """Parameters of `module` one token uses: routed experts' at top_k / experts. `matmul_only`: only the weights
    of matrix multiplies (>= 2-D outside the experts, 3-D inside them; biases and norms left out)."""
    top_k, experts = routed_fraction(arch)
    routed = {id(p) for m in experts_modules(module) for p in m.parameters(recurse=False)}
    total = 0
    for param in module.parameters():
        if id(param) in routed:
            if param.shape[0] != experts:
                raise ValueError(
                    f"{arch.config.model_type}: an experts tensor of shape {tuple(param.shape)} does not lead with "
                    f"the config's {experts} experts; pipegpt reads transformers 5.24's fused [experts, ...] layout"
                )
            total += param.numel() // experts * top_k if param.dim() == 3 or not matmul_only else 0
        elif param.dim() >= 2 or not matmul_only:
            total += param.numel()
    return total


def active_parameters(arch: Architecture) -> int:
    """Parameters per token of the whole model, the token embedding and the head included (each once if tied)."""
    return active_parameters_of(arch, arch.meta_model())


def block_flops_per_token(arch: Architecture, seq_len: int, index: int = 0) -> float:
    layer = arch.meta_model().get_submodule(arch.layer_path(index))
    return 6 * active_parameters_of(arch, layer, matmul_only=True) + 12 * arch.attention_width * seq_len


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
    """Model FLOPs per trained token (active experts only): what MFU divides by."""
    return sum(layer_flops(arch, seq_len, token_weight=False))


def flops_partition(arch: Architecture, seq_len: int, stages: int) -> list[int]:
    """Stage bounds over the pipeline layers that balance `layer_flops`, keeping the final norm with the
    head: a last stage holding only a tied head has no parameters of its own, and DeepSpeed 0.19.8 then
    deadlocks in its first step (mismatched gradient collectives).

    It balances compute, for mixtures of experts too: each micro-batch passes every stage, so the step is paced
    by the stage with the most active FLOPs. There, memory follows the experts' weights instead (DeepSeek-V3's
    three dense first layers hold 1/20 of an MoE layer's weights for about its FLOPs): the stages' memory differs
    and `python -m train.plan` shows both; `--partition-method parameters` balances the weights instead.
    """
    costs = layer_flops(arch, seq_len)
    merged = [*costs[:-2], costs[-2] + costs[-1]]
    bounds = balanced_partition(merged, stages)
    bounds[-1] += 1
    return bounds
