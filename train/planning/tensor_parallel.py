"""The planner's tensor parallelism (`--tensor-parallel t`): what one rank of a slice group holds, saves and sends.

- Weights: `plan_layer` on the meta model says exactly which parameters of each decoder layer are cut; a rank holds
  1/t of those and all of the rest (norms, routers, an unsliced shared expert), and the embedding, final norm and
  head whole. Gradients, the fp32 master and Adam's moments follow the rank's parameters (memory_model.py).
- Activations: what the rank's part of a layer saves, counted on a real layer cut to rank 0's part
  (`cut_for_rank`, in activations.py's narrow copies), without the communication: `enter` is a view and the
  all-reduce of `leave` keeps the shape, and neither saves a tensor (models/tensor_parallel_ops.py), so what is
  saved is exactly a TP rank's: the heads' q/k/v, scores and the MLP intermediate 1/t, the layer's input, norms and
  the cut projections' replicated input whole (Megatron's accounting without sequence parallelism). Families whose
  plan gathers a cut output (Phi-3's fused qkv, OLMo 2's q/k/v: attention then runs on the full width on every
  rank) are counted uncut: an upper bound.
- Communication per decoder layer and micro-batch of T tokens, read off the plan's styles as
  models/tensor_parallel_ops.py runs them: each column-parallel linear all-reduces its input's gradient
  (T x in_features, backward), each row-parallel one its partial output (T x out_features, forward), the fused
  experts both (T x h each, and T x top-k routing weights), MLA's shared rotary key its gradient; gathered and split
  styles all-gather their full output or input gradient. Llama: q, k, v, gate and up each reduce their own input's
  gradient (5 backward all-reduces of T x h; Megatron's fused qkv and gate-up need 2) and o and down their outputs
  (2 forward). The per-head norms' gradient sums (head_dim elements) are left out.
"""

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from models.architecture import DECODER, Architecture
from models.flops import layer_flops
from models.tensor_parallel import (
    COLUMN_STYLES,
    EXPERTS,
    LATENT,
    ROW_STYLES,
    cut_parameters,
    plan_layer,
    tp_styles,
)

# Styles whose cut output is gathered (or whose input is split): the activations between them are full width.
GATHERED = {style for style, gather in (COLUMN_STYLES | ROW_STYLES).items() if gather}


def _decoder_modules(arch: Architecture) -> list[nn.Module | None]:
    """Every pipeline layer's meta decoder layer (None for the embedding, final norm and head)."""
    meta = arch.meta_model()
    return [meta.get_submodule(layer.modules[0]) if layer.kind == DECODER else None for layer in arch.pipeline_layers()]


def rank_layer_parameters(arch: Architecture, tp: int) -> list[int]:
    """Per pipeline layer, the parameters one rank of `tp` holds: a decoder layer's cut ones (exactly as `plan_layer`
    cuts them on the meta model) divided by `tp`, everything else whole."""
    counts = arch.layer_parameters()
    if tp <= 1:
        return counts
    styles, held = tp_styles(arch), []
    for count, module in zip(counts, _decoder_modules(arch), strict=True):
        if module is None:
            held.append(count)
            continue
        cut = sum(module.get_parameter(piece.name).numel() for piece in plan_layer(module, styles, tp).slices)
        held.append(count - cut + cut // tp)
    return held


def rank_layer_flops(arch: Architecture, seq_len: int, tp: int) -> list[float]:
    """Per pipeline layer, one rank's forward + backward FLOPs per token: a decoder layer's 1/`tp` (its matrices and
    heads cut; the replicated norms and router are a rounding error), the embedding's and head's whole."""
    flops = layer_flops(arch, seq_len, token_weight=False)
    return [f / tp if layer.kind == DECODER else f for f, layer in zip(flops, arch.pipeline_layers(), strict=True)]


def cut_for_rank(layer: nn.Module, config: PretrainedConfig, tp: int) -> None:
    """Cut a real decoder layer to rank 0's part of `tp`, without communication (module docstring), so that its
    forward saves what a TP rank's saves; a plan with gathered styles leaves it whole (an upper bound)."""
    styles = tp_styles(config)
    if tp > 1 and not GATHERED & set(styles.values()):
        cut_parameters(layer, plan_layer(layer, styles, tp), 0, tp)


@dataclass(frozen=True)
class Traffic:
    """Elements one rank sends through its slice group's collectives, per token, in one forward and backward of a
    decoder layer."""

    all_reduce: int
    all_gather: int


def _entry_traffic(module: nn.Module | None, style: str, config: PretrainedConfig) -> Traffic:
    if isinstance(module, nn.Linear) and style in COLUMN_STYLES:
        return Traffic(module.in_features, module.out_features if COLUMN_STYLES[style] else 0)
    if isinstance(module, nn.Linear) and style in ROW_STYLES:
        return Traffic(module.out_features, module.in_features if ROW_STYLES[style] else 0)
    if style == EXPERTS:
        return Traffic(2 * config.hidden_size + config.num_experts_per_tok, 0)
    if style == LATENT:
        return Traffic(config.qk_rope_head_dim, 0)
    return Traffic(0, 0)


def layer_traffic(arch: Architecture, tp: int) -> list[Traffic]:
    """Per pipeline layer, its `Traffic` (none outside the decoder layers, none at `tp` 1)."""
    if tp <= 1:
        return [Traffic(0, 0)] * len(arch.pipeline_layers())
    styles, result = tp_styles(arch), []
    for module in _decoder_modules(arch):
        entries = plan_layer(module, styles, tp).styles if module is not None else ()
        parts = [_entry_traffic(_module_or_none(module, name), style, arch.config) for name, style in entries]
        result.append(Traffic(sum(p.all_reduce for p in parts), sum(p.all_gather for p in parts)))
    return result


def _module_or_none(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None  # a parameter entry (a fused expert weight): its experts module's entry communicates


def collective_seconds(all_reduce_bytes: float, all_gather_bytes: float, tp: int, bus_bandwidth: float) -> float:
    """A ring's time at `bus_bandwidth` bytes/s (nccl-tests' bus bandwidth): an all-reduce moves 2 (t - 1) / t of its
    bytes through each rank's link, an all-gather (t - 1) / t of the gathered bytes."""
    if tp <= 1:
        return 0.0
    return (2 * all_reduce_bytes + all_gather_bytes) * (tp - 1) / tp / bus_bandwidth
