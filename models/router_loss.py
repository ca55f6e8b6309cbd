"""The router (load-balancing) loss of a mixture of experts, computed through the pipeline as transformers does.

transformers 5.24's `load_balancing_loss_func` (qwen3_moe, qwen2_moe, mixtral, olmoe, gpt_oss; the same code in
each) takes every MoE layer's router logits of one forward, and with no attention mask computes

    aux = E * sum_e (C_e / N) * (P_e / N)

where C_e counts the top-k picks of expert e (from softmax(logits), no gradient), P_e sums softmax(logits)[:, e]
(with gradient), both summed over ALL layers, and N = MoE layers x tokens. The product of two sums over layers
does not split into per-stage terms, so the running sums travel with the hidden states: P as float32[E] and C as
int64[E] (`models/pipeline.py` says in which order and why). The causal LM adds `router_aux_loss_coef * aux` to
its cross-entropy; DeepSeek-V2/V3 and GLM-4.5 record router logits but add nothing, so for them this is None and
`output_router_logits` changes nothing, as in transformers.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from deepspeed import checkpointing
from torch import nn

from models.loss import next_token_cross_entropy


@dataclass(frozen=True)
class RouterLoss:
    """What the pipeline needs to reproduce a family's router loss."""

    router: type[nn.Module]  # the router class whose outputs transformers records as `router_logits`
    index: int  # which of the router's outputs are its logits
    num_experts: int
    top_k: int
    coef: float  # router_aux_loss_coef
    moe_layers: int  # decoder layers with a router, in the whole model: N = moe_layers x tokens


def router_loss_of(model: nn.Module) -> RouterLoss | None:
    """The router loss `model` (a causal LM, e.g. on the meta device) adds to its loss, or None."""
    if not getattr(model.config, "output_router_logits", False) or not hasattr(model, "router_aux_loss_coef"):
        return None  # off, or a family whose causal LM adds no router loss (DeepSeek, GLM-4.5)
    recorder = getattr(type(model.base_model), "_can_record_outputs", {}).get("router_logits")
    router = getattr(recorder, "target_class", None)
    if router is None:
        raise ValueError(f"{model.config.model_type}: cannot find the router whose logits its router loss reads")
    return RouterLoss(
        router=router,
        index=recorder.index,
        num_experts=model.num_experts,
        top_k=model.num_experts_per_tok,
        coef=float(model.router_aux_loss_coef),
        moe_layers=sum(isinstance(m, router) for m in model.modules()),
    )


def empty_router_sums(loss: RouterLoss, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C) before the first layer. P requires a gradient: DeepSpeed asserts one for every float tensor a stage
    sends, and a first stage of dense layers alone would otherwise send a P without a graph."""
    probs = torch.zeros(loss.num_experts, dtype=torch.float32, device=device)
    if torch.is_grad_enabled():
        probs.requires_grad_(True)
    return probs, torch.zeros(loss.num_experts, dtype=torch.int64, device=device)


def add_router_sums(
    loss: RouterLoss, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C) plus one router's logits, reduced as `load_balancing_loss_func` reduces each layer's."""
    weights = torch.softmax(logits.reshape(-1, loss.num_experts), dim=-1)  # in the logits' dtype, as HF
    _, selected = torch.topk(weights, loss.top_k, dim=-1)
    picks = selected.reshape(-1)
    # Integer counts are exact, deterministic and sync-free on any device (HF's histc counts the same integers).
    counts = counts + torch.zeros_like(counts).scatter_add_(0, picks, torch.ones_like(picks))
    return probs + weights.float().sum(dim=0), counts


def load_balancing_loss(loss: RouterLoss, probs: torch.Tensor, counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` from the sums of all MoE layers over `tokens` rows."""
    rows = float(loss.moe_layers * tokens)
    tokens_per_expert = counts.float() / rows
    return torch.sum(tokens_per_expert * (probs / rows).unsqueeze(0)) * loss.num_experts


class CrossEntropyWithRouterLoss:
    """The pipeline's loss_fn with the router loss: (logits, P, C), labels -> cross-entropy + coef x aux.

    That is `AutoModelForCausalLM(ids, labels=...).loss` of the micro-batch; DeepSpeed averages micro-batches.
    The aux terms of training micro-batches (not evaluation's: those run without gradients) add up until
    `take_aux` reads them, for the `aux_loss` metric."""

    def __init__(self, loss: RouterLoss):
        self.loss = loss
        self.aux_loss: torch.Tensor | None = None  # the last micro-batch's
        self._aux_sum: torch.Tensor | float = 0.0
        self._aux_count = 0

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], labels) -> torch.Tensor:
        logits, probs, counts = outputs
        aux = load_balancing_loss(self.loss, probs, counts, logits.shape[:-1].numel())
        self.aux_loss = aux.detach()
        if torch.is_grad_enabled():
            self._aux_sum, self._aux_count = self._aux_sum + self.aux_loss, self._aux_count + 1
        return next_token_cross_entropy(logits, labels) + self.loss.coef * aux

    def take_aux(self) -> tuple[float, int]:
        """(sum, count) of the training micro-batches' aux terms since the last call."""
        taken = (float(self._aux_sum), self._aux_count)
        self._aux_sum, self._aux_count = 0.0, 0
        return taken


def pipeline_settings(loss: RouterLoss | None) -> dict[str, Callable]:
    """The `PipelineModule` arguments the router loss sets: the loss function, and the function that checkpoints
    activations (`--activation-checkpoint-interval`), DeepSpeed's default, or with the router loss its non-reentrant
    one. A stage then sends two float tensors (hidden, P) and DeepSpeed 0.19.8 backpropagates each on its own
    (engine.py `_exec_backward_pass`, `retain_graph` between them), which runs a reentrant checkpoint's backward
    twice; it freed its inputs the first time (`'NoneType' object is not iterable`, checkpointing.py:700, seen on 3
    stages). The non-reentrant one keeps its recomputed activations for the second: gradients bit-identical."""
    if loss is None:
        return {"loss_fn": next_token_cross_entropy, "activation_checkpoint_func": checkpointing.checkpoint}
    return {
        "loss_fn": CrossEntropyWithRouterLoss(loss),
        "activation_checkpoint_func": checkpointing.non_reentrant_checkpoint,
    }


@contextmanager
def recorded_router_logits(loss: RouterLoss | None, layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The logits of every router in `layer` called inside the block (none when `loss` is None), read from the
    router's own outputs as transformers' output recorder reads them."""
    found: list[torch.Tensor] = []
    routers = [m for m in layer.modules() if isinstance(m, loss.router)] if loss is not None else []
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out[loss.index])) for m in routers]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()
