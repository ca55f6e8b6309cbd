"""How a tensor-parallel checkpoint's slices join in DeepSpeed's universal checkpoint (docs/tensor_parallel.md).

DeepSpeed 0.19.8's converter (`deepspeed/checkpoint/ds_to_universal.py: merge_tp_slices`) joins each parameter's
slices by the patterns the saving run declares in its client state (`universal_checkpoint_info`, read from
`mp_rank_00_model_states.pt`); a parameter no pattern names is concatenated along dimension 0, which doubles a
replicated norm or embedding and misplaces a row-parallel weight. So a tensor-parallel run declares every parameter
of the model (the pipeline module's names, e.g. `3.layer.self_attn.o_proj.weight`, exact patterns):

- replicated ones in `tp_replicated_parameter_patterns` (the converter checks the slices are equal and keeps one);
- every cut one as a "parameter with sub-parameters" (`parameter_with_sub_params`: its full shape with the cut
  dimension given as the widths of its equal blocks, and the dimension; `sub_param_shard_widths`, required from
  universal version 0.4: each rank's width of each block). That one form expresses every `Slice` of
  models/tensor_parallel.py: colwise (dimension 0), rowwise (1), a 3-D expert weight's colwise (1) or rowwise (2),
  a fused gate/up (2 blocks along 1); the converter's other categories only cut 2-D weights along 0 or 1.

The loading side (any tensor-parallel size) cuts the joined tensors by what each cut parameter of the loading run
records (`models/deepspeed_internals.py: mark_universal_slice`), the same `Slice` facts.
"""

from deepspeed.checkpoint.constants import (
    PARAMETER_WITH_SUB_PARAMS,
    SUB_PARAM_SHARD_WIDTHS,
    TP_REPLICATED_PARAMETER_PATTERNS,
)
from torch import nn

from models.deepspeed_internals import universal_slice

# name -> (cut dimension, full shape, equal blocks) of a cut parameter, None for a replicated one
SliceLayout = dict[str, tuple[int, tuple[int, ...], int] | None]


def slice_layout(pipe: nn.Module) -> SliceLayout:
    """This rank's parameters (its stage's), cut or replicated, as `slice_stage` marked them."""
    return {name: universal_slice(param) for name, param in pipe.named_parameters()}


def universal_checkpoint_patterns(layout: SliceLayout, size: int) -> dict:
    """The `universal_checkpoint_info` entries that make DeepSpeed's converter join every parameter of `layout`
    (every stage's, gathered) from `size` slices exactly as `Slice.join` does."""
    replicated, shapes, widths = [], {}, {}
    for name, cut in sorted(layout.items()):
        pattern = _exact(name)
        if cut is None:
            replicated.append(pattern)
            continue
        dim, full, pieces = cut
        block = full[dim] // pieces
        shape = (*full[:dim], (block,) * pieces, *full[dim + 1 :])
        shapes.setdefault((shape, dim), []).append(pattern)
        widths[pattern] = [[block // size] * size] * pieces
    sub_params = [{"patterns": p, "shape": shape, "partition_dim": dim} for (shape, dim), p in shapes.items()]
    return {
        TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        PARAMETER_WITH_SUB_PARAMS: sub_params,
        SUB_PARAM_SHARD_WIDTHS: widths,
    }


def _exact(name: str) -> str:
    """A pattern (`re.match`) for this name alone: `1.layer.x` must not match `11.layer.x`."""
    return name.replace(".", r"\.") + "$"
