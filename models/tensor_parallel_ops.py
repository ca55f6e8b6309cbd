"""The communication of a sliced decoder layer: Megatron-style autograd functions over one process group, and the
module changes that put them around transformers' own modules (models/tensor_parallel.py decides which go where).

Four functions, each the other's transpose (Megatron-LM's `mappings.py`): `enter` (identity forward, all-reduce of
the gradient: a replicated input read by sliced weights), `leave` (all-reduce forward, identity backward: partial
sums out of a row-sliced product), `gather` (all-gather of the last dimension forward, the rank's own part of the
gradient backward) and `split` (the rank's own part of the last dimension forward, all-gather of the gradient
backward). All run inside autograd, so a micro-batch's backward reduces its own gradients only: a hook on an
accumulated `.grad` (transformers 5.24's `ReplicatedWithGradAllReduce` uses `register_post_accumulate_grad_hook`)
would reduce the earlier micro-batches' sum again under gradient accumulation.
"""

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # a fresh tensor of autograd's, reduced in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Leave(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_part(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)].contiguous()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _own_part(grad, ctx.group), None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _own_part(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_last(grad, ctx.group), None


def enter(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; the gradient summed over `group` (each rank's sliced weights saw all of `x`)."""
    return _Enter.apply(x, group)


def leave(x: torch.Tensor, group) -> torch.Tensor:
    """`x` summed over `group` (each rank's partial product); the gradient passed on as it is."""
    return _Leave.apply(x, group)


class ColumnParallelLinear(nn.Linear):
    """An `nn.Linear` holding this rank's rows of the weight (output features) and of the bias. Its input is
    replicated (`enter`); its output stays sliced (`colwise`) or is gathered into the full width
    (`colwise_gather_output`). The class of a transformers `nn.Linear` is switched to it in place: the parameters
    keep their names, and `isinstance(module, nn.Linear)` still holds."""

    tp_group = None
    tp_gather = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(enter(x, self.tp_group), self.weight, self.bias)
        return _Gather.apply(out, self.tp_group) if self.tp_gather else out


class RowParallelLinear(nn.Linear):
    """An `nn.Linear` holding this rank's columns of the weight (input features): its input is this rank's slice
    (`rowwise`), or the full width of which it takes its part (`rowwise_split_input`); the partial products are
    summed over the group (`leave`) and the bias, replicated, is added once after the sum."""

    tp_group = None
    tp_split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _Split.apply(x, self.tp_group) if self.tp_split else x
        out = leave(F.linear(x, self.weight), self.tp_group)
        return out if self.bias is None else out + self.bias


def make_column_parallel(module: nn.Linear, group, gather: bool) -> None:
    """Switch `module`, its weight and bias already cut to this rank's rows, to `ColumnParallelLinear`."""
    module.__class__ = ColumnParallelLinear
    module.tp_group, module.tp_gather = group, gather


def make_row_parallel(module: nn.Linear, group, split: bool) -> None:
    """Switch `module`, its weight already cut to this rank's columns, to `RowParallelLinear`."""
    module.__class__ = RowParallelLinear
    module.tp_group, module.tp_split = group, split


def _sum_grad(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def sum_parameter_gradients(module: nn.Module, group) -> None:
    """Replicated parameters that see only this rank's heads (Qwen3's per-head `q_norm`): each backward's gradient
    of them is summed over `group` before it is accumulated (a tensor hook, once per backward)."""
    for param in module.parameters(recurse=False):
        param.register_hook(functools.partial(_sum_grad, group=group))


def _experts_inputs(module: nn.Module, args: tuple, kwargs: dict, group) -> tuple[tuple, dict]:
    # transformers 5.24's MoE blocks call `experts(hidden_states, top_k_index, top_k_weights)`
    args = list(args)
    for position, name in ((0, "hidden_states"), (2, "top_k_weights")):
        if position < len(args):
            args[position] = enter(args[position], group)
        elif name in kwargs:
            kwargs[name] = enter(kwargs[name], group)
    return tuple(args), kwargs


def _experts_output(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, group) -> torch.Tensor:
    return leave(output, group)


def parallel_experts(module: nn.Module, group) -> None:
    """transformers' fused experts with every expert's intermediate width sliced: the tokens and their routing
    weights enter the group (each rank's slice of every expert reads them all), the partial outputs leave it."""
    module.register_forward_pre_hook(functools.partial(_experts_inputs, group=group), with_kwargs=True)
    module.register_forward_hook(functools.partial(_experts_output, group=group), with_kwargs=True)


def _latent_output(module: nn.Module, args: tuple, output: torch.Tensor, group, rope: int) -> torch.Tensor:
    latent, shared_rope_key = output.split([output.shape[-1] - rope, rope], dim=-1)
    return torch.cat([latent, enter(shared_rope_key, group)], dim=-1)


def parallel_latent_projection(module: nn.Module, group, rope_dim: int) -> None:
    """MLA's replicated `kv_a_proj_with_mqa`: its output's last `rope_dim` features are the rotary key shared by
    every head, read by this rank's heads only, so their gradient is summed over `group`; the rest feeds the
    column-sliced `kv_b_proj`, whose `enter` sums it already (transformers 5.24's `MlaKvAProjParallel`)."""
    module.register_forward_hook(functools.partial(_latent_output, group=group, rope=rope_dim))
