"""Which experts a mixture of experts' routers pick: per MoE decoder layer, the tokens sent to each expert.

transformers 5.24 runs the routed experts of every MoE family as one module, decorated with
`use_experts_implementation` (integrations/moe.py), that the family's MoE block calls as
`experts(hidden_states, top_k_index, top_k_weights)` (gpt-oss names them `router_indices, routing_weights`). Its index
argument holds the picks the model really made: for DeepSeek-V2/V3 and GLM-4.5 the group-limited top-k steered by
`e_score_correction_bias`, not a plain top-k of the logits. A forward pre-hook on that module adds the picks to an
int64[E] buffer of its pipeline layer (`expert_picks`): one generic way for every family, with or without the router
loss; exact integers, kept on the device (scatter_add: no synchronisation).

Only training forwards count. The pipeline turns counting on for the length of its own forward in training mode
(`StagePicks.counting`): evaluation and sampling run in eval mode, and activation checkpointing's recompute runs the
layers again during backward, outside the pipeline's forward (DeepSpeed 0.19.8's reentrant `checkpoint` and
`non_reentrant_checkpoint` alike), so neither counts.
"""

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# What `use_experts_implementation` (transformers 5.24) sets on every experts module it decorates.
EXPERTS_MARKS = ("num_experts", "has_gate", "is_concatenated")


def is_experts(module: nn.Module) -> bool:
    """A family's routed experts (the module called with the top-k picks)."""
    return all(hasattr(module, mark) for mark in EXPERTS_MARKS)


@dataclass(frozen=True)
class ExpertLayers:
    """The decoder layers of a mixture of experts that hold routed experts."""

    layers: tuple[int, ...]  # their decoder indices, ascending: row i of a load table is decoder layer layers[i]
    num_experts: int  # routed experts per layer (the widest layer's, should a family ever vary them)
    top_k: int  # experts each token is sent to (num_experts_per_tok): a layer's picks are tokens x top_k


def expert_layers_of(decoder_layers: nn.ModuleList, top_k: int | None) -> ExpertLayers | None:
    """The MoE layers among `decoder_layers` (e.g. of the meta model), or None for a dense model."""
    widths = {i: [m.num_experts for m in layer.modules() if is_experts(m)] for i, layer in enumerate(decoder_layers)}
    widths = {i: width for i, width in widths.items() if width}
    if not widths:
        return None
    if top_k is None:
        raise ValueError("a mixture of experts without num_experts_per_tok in its config: cannot tell its top-k")
    return ExpertLayers(tuple(widths), max(max(width) for width in widths.values()), int(top_k))


def count_picks(owner: nn.Module, experts: ExpertLayers | None, decoder_index: int) -> None:
    """Make pipeline layer `owner` (holding decoder layer `decoder_index`) count its experts' picks into its buffer
    `expert_picks` (int64[E], not saved) while `owner.counting_picks` is true. Nothing for a dense layer."""
    if experts is None or decoder_index not in experts.layers:
        return
    owner.register_buffer("expert_picks", torch.zeros(experts.num_experts, dtype=torch.int64), persistent=False)
    owner.expert_row = experts.layers.index(decoder_index)
    owner.counting_picks = False
    for module in owner.modules():
        if is_experts(module):
            module.register_forward_pre_hook(_pick_counter(owner, module), with_kwargs=True)


def _pick_counter(owner: nn.Module, experts: nn.Module):
    index_name = list(inspect.signature(experts.forward).parameters)[1]  # after the hidden states

    def count(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if owner.counting_picks:
            picks = (args[1] if len(args) > 1 else kwargs[index_name]).reshape(-1)
            owner.expert_picks.scatter_add_(0, picks, torch.ones_like(picks))

    return count


class StagePicks:
    """The picks of the MoE layers one pipeline rank holds (both of its stages under DualPipeV)."""

    def __init__(self, experts: ExpertLayers | None, layers: Iterable[nn.Module]):
        self.experts = experts
        self.layers = [layer for layer in layers if hasattr(layer, "expert_picks")]

    @contextmanager
    def counting(self, on: bool) -> Iterator[None]:
        """Count the picks of the forwards inside the block when `on`."""
        for layer in self.layers:
            layer.counting_picks = on
        try:
            yield
        finally:
            for layer in self.layers:
                layer.counting_picks = False

    def take(self, device: torch.device | str) -> torch.Tensor | None:
        """The picks counted since the last take as an int64 [MoE layers, E] table on `device` (rows of layers other
        ranks hold are zero: a sum over all ranks fills every row), the counters reset; None for a dense model."""
        if self.experts is None:
            return None
        table = torch.zeros(len(self.experts.layers), self.experts.num_experts, dtype=torch.int64, device=device)
        for layer in self.layers:
            table[layer.expert_row] += layer.expert_picks.to(device)
            layer.expert_picks.zero_()
        return table
