"""Tensor parallelism in the pipeline: DeepSpeed's grid with a slice axis, a built stage's decoder layers cut over
it (models/tensor_parallel.py), each cut parameter marked for DeepSpeed's universal-checkpoint loader, and a
checkpoint's per-slice layer files joined back for the export or re-cut for another tensor-parallel size.

DeepSpeed 0.19.8's `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` orders its axes pipe, data, model: the
ranks of one slice group are consecutive (one node), a pipeline's stages and the replicas lie across them. Its
pipeline module writes a cut layer's file once per slice rank, `layer_NN-model_MM-model_states.pt`
(`ProcessTopology.get_rank_repr`: the model axis kept), and `load_state_dir` hands each slice rank its own file
(of the same size only: `resliced_layer_state` builds it otherwise).
"""

from pathlib import Path

import torch
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from models.architecture import DECODER, DECODER_ATTR, Architecture
from models.deepspeed_internals import mark_universal_slice, slice_parallel_group
from models.tensor_parallel import plan_layer, slice_layer, tp_styles


def pipeline_topology(num_stages: int, tensor_parallel: int, world_size: int) -> PipeModelDataParallelTopology | None:
    """The grid for `tensor_parallel` > 1 (else None: DeepSpeed's own pipe x data grid, files without `model_MM`)."""
    if tensor_parallel <= 1:
        return None
    replicas = world_size // (num_stages * tensor_parallel)
    return PipeModelDataParallelTopology(num_pp=num_stages, num_mp=tensor_parallel, num_dp=replicas)


def slice_stage(pipe, arch: Architecture) -> int:
    """Cut every decoder layer this rank holds to its slice rank's part (after the full weights are loaded, before
    the optimizer sees the parameters). Returns the layers cut (0 without a slice axis)."""
    rank, size, group = slice_parallel_group(pipe)
    if size <= 1:
        return 0
    styles, layers, cut = tp_styles(arch), arch.pipeline_layers(), 0
    for index, module in pipe.stage_modules():
        if layers[index].kind == DECODER:
            layer = getattr(module, DECODER_ATTR)
            full = {name: tuple(param.shape) for name, param in layer.named_parameters()}
            for piece in slice_layer(layer, styles, rank, size, group).slices:  # for a universal checkpoint's loader
                mark_universal_slice(layer.get_parameter(piece.name), piece.dim, full[piece.name], piece.pieces)
            cut += 1
    return cut


def join_layer_files(paths: list[Path], arch: Architecture, index: int) -> dict[str, torch.Tensor]:
    """One pipeline layer's state from its files, one per slice rank in rank order (a single file: as it is)."""
    states = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    spec = arch.pipeline_layers()[index]
    if len(states) == 1 or spec.kind != DECODER:  # the embedding, the final norm and the head are replicated
        return states[0]
    layer = arch.meta_model().get_submodule(arch.layer_path(spec.decoder_index))
    cut = {f"{DECODER_ATTR}.{piece.name}": piece for piece in plan_layer(layer, tp_styles(arch), len(states)).slices}
    return {k: cut[k].join([s[k] for s in states]) if k in cut else v for k, v in states[0].items()}


def resliced_layer_state(paths: list[Path], arch: Architecture, index: int, rank: int, size: int) -> dict:
    """Pipeline layer `index`'s state for slice rank `rank` of `size` from a checkpoint of any tensor-parallel size
    (its files, one per slice rank that saved it): the slices joined (`join_layer_files`), then cut (`Slice.take`)."""
    full = join_layer_files(paths, arch, index)
    spec = arch.pipeline_layers()[index]
    if size <= 1 or spec.kind != DECODER:
        return full
    layer = arch.meta_model().get_submodule(arch.layer_path(spec.decoder_index))
    cut = {f"{DECODER_ATTR}.{piece.name}": piece for piece in plan_layer(layer, tp_styles(arch), size).slices}
    return {k: cut[k].take(v, rank, size) if k in cut else v for k, v in full.items()}
