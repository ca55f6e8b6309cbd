"""Tensor parallelism inside a decoder layer: its matrices cut across the ranks of one process group by the family's
own `config.base_model_tp_plan`, computing what the whole layer computes (tests/unit/test_tensor_parallel.py; every
supported type: tests/integration/test_tensor_parallel_sweep.py; docs/tensor_parallel.md).

Why not transformers' own: transformers 5.24 (`transformers/distributed/tensor_parallel.py`) applies a plan by
turning each parameter into a DTensor on a `DeviceMesh` and installing forward hooks that redistribute DTensors.
DeepSpeed 0.19.8's pipeline engine, its optimizers and ZeRO-1 flatten and all-reduce plain tensors and know nothing of
DTensors, and its global gradient norm recognises a slice only by `param.model_parallel`; the hooks also sum a
replicated norm's gradient in a post-accumulate hook, once more per micro-batch under gradient accumulation. So the
plan's *names* are transformers' (read from the config, restricted to the decoder layers) and the implementation is
Megatron's: plain parameters cut in place, autograd functions over a given (gloo or NCCL) group
(models/tensor_parallel_ops.py), every cut parameter marked `model_parallel = True`, replicated ones not.

Styles (transformers 5.24's names): `colwise` (output features cut; the attention's heads when on q/k/v: its
forward reshapes with `view(..., -1, head_dim)`, so it runs on the rank's heads with no head count to change),
`colwise_gather_output` / `colwise_rep` (cut, then gathered: Phi-3's fused qkv, OLMo 2's q/k/v normed over the full
width), `rowwise` (input features cut, the partial sums all-reduced, the bias added once; on a MoE's 3-D `down_proj`
the expert's intermediate width), `rowwise_split_input` / `rowwise_rep` (the same on a replicated input),
`packed_colwise` (a MoE's fused `gate_up_proj`: the gate and up halves each cut), `moe_tp_experts`,
`replicated_with_grad_allreduce` (a per-head norm; also what `tp_styles` adds for a parameter between cut
projections that a plan leaves out), `mla_kv_a_proj` (MLA's shared rotary key) and `replicate`.
Others (`sequence_parallel`, `local_params`, `packed_rowwise`, ...) are refused in one line. Every other parameter of
the layer (norms, routers, an unsliced shared expert, DeepSeek-V3's attention, for which 5.24 has no entries) is
replicated. Embedding and head are not in a decoder layer: they stay replicated (a vocabulary-parallel head needs a
vocabulary-parallel cross-entropy in the loss stage). Key/value heads must divide among the ranks (Megatron's
replication of fewer kv heads is not done) and dropout in the layers is refused (no per-rank RNG tracker).
"""

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from models.architecture import Architecture, discover, meta_model
from models.tensor_parallel_ops import (
    make_column_parallel,
    make_row_parallel,
    parallel_experts,
    parallel_latent_projection,
    sum_parameter_gradients,
)

# style -> (gathered output, split input) of a sliced `nn.Linear`
COLUMN_STYLES = {"colwise": False, "colwise_gather_output": True, "colwise_rep": True}
ROW_STYLES = {"rowwise": False, "rowwise_split_input": True, "rowwise_rep": True}
PACKED, EXPERTS, SUMMED, LATENT, REPLICATE = (
    "packed_colwise",
    "moe_tp_experts",
    "replicated_with_grad_allreduce",
    "mla_kv_a_proj",
    "replicate",
)
SUPPORTED_STYLES = (*COLUMN_STYLES, *ROW_STYLES, PACKED, EXPERTS, SUMMED, LATENT, REPLICATE)
WITHOUT = "train it without tensor parallelism (size 1)"
# Config fields of dropout outside the decoder layers (the replicated embedding) or outside a causal LM.
_NOT_IN_LAYERS = re.compile(r"emb|classifier")


@dataclass(frozen=True)
class Slice:
    """One cut parameter of a decoder layer: each rank holds 1/size of it along `dim` (in each of `pieces` equal
    blocks: a fused gate/up weight is two)."""

    name: str  # inside the decoder layer, e.g. "self_attn.q_proj.weight", "mlp.experts.gate_up_proj"
    dim: int
    pieces: int = 1

    def take(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s part of the full tensor (a copy)."""
        blocks = full.chunk(self.pieces, self.dim)
        return torch.cat([block.chunk(size, self.dim)[rank] for block in blocks], self.dim).clone()

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's part, in rank order (the inverse of `take`)."""
        blocks = [part.chunk(self.pieces, self.dim) for part in parts]
        return torch.cat([torch.cat([b[i] for b in blocks], self.dim) for i in range(self.pieces)], self.dim)


@dataclass(frozen=True)
class LayerSlicing:
    """What `slice_layer` does to one decoder layer (and did, once it returns)."""

    slices: tuple[Slice, ...]  # cut parameters, marked `model_parallel = True`
    summed: tuple[str, ...]  # replicated parameters whose gradient is summed over the group (per-head norms)
    styles: tuple[tuple[str, str], ...]  # (module or parameter inside the layer, style) of the entries it matched


def _plan_error(model_type: str, size: int, problem: str, fix: str) -> ValueError:
    return ValueError(f"tensor-parallel size {size}: {model_type} {problem}; {fix}")


def tp_styles(arch_or_config: Architecture | PretrainedConfig) -> dict[str, str]:
    """{name inside a decoder layer: style}: `config.base_model_tp_plan`'s entries for the decoder layers (the
    embedding's are dropped: it stays replicated). Parameters that sit between cut projections and that a 5.24 plan
    leaves out get their gradient summed, as Qwen3's plan marks its q/k norms: GLM-4.5's per-head `q_norm`/`k_norm`,
    Apertus's learned activation (`mlp.act_fn`'s alphas); an absent module's entry is skipped. Empty when the family
    has no plan for its layers."""
    arch = arch_or_config if isinstance(arch_or_config, Architecture) else discover(arch_or_config)
    prefix = f"{arch.layers}.*."
    plan = arch.config.base_model_tp_plan or {}
    styles = {key.removeprefix(prefix): style for key, style in plan.items() if key.startswith(prefix)}
    for region in sorted(_cut_regions(styles)):
        for inside in ("q_norm", "k_norm", "act_fn"):
            styles.setdefault(f"{region}.{inside}", SUMMED)
    return styles


def _cut_regions(styles: dict[str, str]) -> set[str]:
    """The modules (`self_attn`, `mlp`) whose projections are cut without gathering: their activations in between
    are the rank's part (the attention's heads)."""
    return {name.rpartition(".")[0] for name, style in styles.items() if style == "colwise"}


def _attentions_cut_by_heads(styles: dict[str, str]) -> set[str]:
    return {region for region in _cut_regions(styles) if re.search("attn|attention", region)}


def check_tensor_parallel(config: PretrainedConfig, tp: int) -> None:
    """A ValueError with one line naming the problem and the fix when `config`'s model cannot be cut `tp` ways:
    no plan for its layers, a style not implemented, heads or a width not divisible by `tp`, dropout in the layers.
    Every decoder layer is planned on the meta device (no memory), as `slice_layer` will cut it."""
    if tp <= 1:
        return
    arch = discover(config)
    model_type, styles = config.model_type, tp_styles(arch)
    if not styles:
        raise _plan_error(
            model_type,
            tp,
            "has no tensor-parallel plan for its decoder layers in transformers (base_model_tp_plan)",
            WITHOUT,
        )
    dropouts = {
        k: v for k, v in config.to_dict().items() if re.search("dropout|pdrop", k) and not _NOT_IN_LAYERS.search(k)
    }
    dropouts = {k: v for k, v in dropouts.items() if isinstance(v, float) and v > 0}
    if dropouts:
        raise _plan_error(
            model_type,
            tp,
            f"sets dropout in its layers ({', '.join(f'{k}={v}' for k, v in dropouts.items())}), "
            "which the ranks of a sliced layer would draw apart",
            "set it to 0 in the model config",
        )
    if _attentions_cut_by_heads(styles):
        heads = config.num_attention_heads
        for what, count in (
            ("attention heads", heads),
            ("key/value heads", getattr(config, "num_key_value_heads", heads)),
        ):
            if count % tp:
                raise _plan_error(
                    model_type,
                    tp,
                    f"has {count} {what}, which do not divide among {tp} ranks",
                    f"use a tensor-parallel size that divides {count} (kv heads are not replicated across ranks)",
                )
    model = meta_model(arch.config)
    for index in range(arch.num_layers):
        plan_layer(model.get_submodule(arch.layer_path(index)), styles, tp, model_type)


def _target(layer: nn.Module, name: str) -> nn.Module | torch.Tensor | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        pass
    try:
        return layer.get_parameter(name)
    except AttributeError:
        return None  # an entry for another kind of layer (a dense MLP's in a MoE layer): skipped, as transformers does


def _cut(name: str, shape: torch.Size, dim: int, size: int, model_type: str, pieces: int = 1) -> Slice:
    if shape[dim] % (size * pieces):
        width = f"{shape[dim] // pieces} per half" if pieces > 1 else str(shape[dim])
        raise _plan_error(
            model_type,
            size,
            f"{name} has {width} features along dimension {dim}, not divisible by {size}",
            "use a tensor-parallel size that divides it",
        )
    return Slice(name, dim, pieces)


def plan_layer(layer: nn.Module, styles: dict[str, str], size: int, model_type: str = "the model") -> LayerSlicing:
    """What `slice_layer` would do to `layer` (a real or meta decoder layer), or one ValueError line: a style not
    implemented, on a module it does not fit, or a width not divisible by `size`."""
    slices, summed, matched = [], [], []
    for name, style in styles.items():
        target = _target(layer, name)
        if target is None:
            continue
        if style not in SUPPORTED_STYLES:
            raise _plan_error(model_type, size, f"{name} has style {style!r}, not implemented here", WITHOUT)
        matched.append((name, style))
        if isinstance(target, torch.Tensor):
            slices.append(_parameter_slice(layer, name, target, style, size, model_type))
        else:
            cut, grad_summed = _module_slices(name, target, style, size, model_type)
            slices += cut
            summed += grad_summed
    return LayerSlicing(tuple(slices), tuple(summed), tuple(matched))


def _module_slices(
    name: str, module: nn.Module, style: str, size: int, model_type: str
) -> tuple[list[Slice], list[str]]:
    """(cut parameters, gradient-summed parameters) of a plan entry naming a module."""
    if style in COLUMN_STYLES or style in ROW_STYLES:
        if type(module) is not nn.Linear:
            raise _plan_error(
                model_type,
                size,
                f"{name} is a {type(module).__name__}, not an nn.Linear, under style {style!r}",
                WITHOUT,
            )
        row = style in ROW_STYLES
        cut = [_cut(f"{name}.weight", module.weight.shape, int(row), size, model_type)]
        if module.bias is not None and not row:  # a row-parallel bias is replicated, added once after the sum
            cut.append(_cut(f"{name}.bias", module.bias.shape, 0, size, model_type))
        return cut, []
    if style == SUMMED:
        params = dict(module.named_parameters(recurse=False))
        if any(p.dim() != 1 for p in params.values()):
            raise _plan_error(model_type, size, f"{name} holds a weight per head, which the plan does not cut", WITHOUT)
        return [], [f"{name}.{p}" for p in params]
    if style == EXPERTS and (getattr(module, "is_transposed", False) or getattr(module, "has_bias", False)):
        raise _plan_error(
            model_type,
            size,
            f"{name} stores its experts transposed or with biases, which the plan does not cut",
            WITHOUT,
        )
    return [], []


def _parameter_slice(layer: nn.Module, name: str, param: torch.Tensor, style: str, size: int, model_type: str) -> Slice:
    """A plan entry naming a parameter: a MoE's fused 3-D expert weights, (experts, out, in) in transformers 5.24."""
    owner = layer.get_submodule(name.rpartition(".")[0])
    if param.dim() != 3 or getattr(owner, "is_transposed", False) or style not in (PACKED, "colwise", "rowwise"):
        raise _plan_error(
            model_type,
            size,
            f"{name} ({param.dim()}-D) has style {style!r}, not implemented on a parameter",
            WITHOUT,
        )
    if style == "rowwise":
        return _cut(name, param.shape, 2, size, model_type)
    return _cut(name, param.shape, 1, size, model_type, pieces=2 if style == PACKED else 1)


def slice_layer(layer: nn.Module, styles: dict[str, str], rank: int, size: int, group) -> LayerSlicing:
    """Cut the decoder layer `layer` in place to rank `rank`'s part of `size`, communicating over `group` (the
    pipeline grid's slice group): each cut parameter replaced by its part (a new `nn.Parameter`, under its name,
    `model_parallel = True`), the sliced modules given their communication (models/tensor_parallel_ops.py). Every rank
    must hold the same full weights before (same seed or same checkpoint). Returns what it did."""
    plan = plan_layer(layer, styles, size)
    cut_parameters(layer, plan, rank, size)
    for name, style in plan.styles:
        target = _target(layer, name)
        if not isinstance(target, torch.Tensor):  # a cut expert weight: its experts module's entry communicates
            _communicate(layer, target, style, group)
    return plan


def cut_parameters(layer: nn.Module, plan: LayerSlicing, rank: int, size: int) -> None:
    """Replace each of `plan`'s cut parameters of `layer` by rank `rank`'s part (a new `nn.Parameter`, marked
    `model_parallel = True`), without communication: `slice_layer`'s first half, and the planner's rank-sized layer."""
    with torch.no_grad():
        for piece in plan.slices:
            owner_name, _, attr = piece.name.rpartition(".")
            owner, old = layer.get_submodule(owner_name), layer.get_parameter(piece.name)
            new = nn.Parameter(piece.take(old.detach(), rank, size), requires_grad=old.requires_grad)
            new.model_parallel = True  # DeepSpeed 0.19.8's global grad norm counts it on every slice rank
            setattr(owner, attr, new)


def _communicate(layer: nn.Module, module: nn.Module, style: str, group) -> None:
    if style in COLUMN_STYLES:
        module.out_features = module.weight.shape[0]
        make_column_parallel(module, group, gather=COLUMN_STYLES[style])
    elif style in ROW_STYLES:
        module.in_features = module.weight.shape[1]
        make_row_parallel(module, group, split=ROW_STYLES[style])
    elif style == EXPERTS:
        parallel_experts(module, group)
    elif style == SUMMED:
        sum_parameter_gradients(module, group)
    elif style == LATENT:
        parallel_latent_projection(module, group, layer_config(layer).qk_rope_head_dim)


def layer_config(layer: nn.Module) -> PretrainedConfig:
    """The config a transformers decoder layer's attention keeps (`self_attn.config`)."""
    return next(m.config for m in layer.modules() if isinstance(getattr(m, "config", None), PretrainedConfig))
