"""Any supported Hugging Face causal LM as a flat list of DeepSpeed pipeline layers, one per entry of
`Architecture.pipeline_layers` (the one place their order is written):

    embedding   EmbeddingPipe     (input_ids, position_ids) -> (hidden, position_ids): token embedding, learned
                                  positions, dropout (the decoder's modules before its layers)
    decoder     DecoderLayerPipe  transformers' own decoder layer, one per layer, with its own rotary module and
                                  the mask transformers' masking utilities give its positions (models/masking.py)
    final_norm  FinalNormPipe     the final norm; only the hidden states go on
    head        HeadPipe          an untied LM head, then the logits' scale or soft-cap (models/family_verdict.py)
    tied_head   EmbeddingPipe     the embedding again (TiedLayerSpec), as F.linear(h, token_embedding.weight), same

Between stages travel the hidden states and the int64 positions (per document under `--attention document`,
0..S-1 otherwise): DeepSpeed 0.19.8 marks every received float tensor `requires_grad` and asserts a gradient
for it, but leaves integer tensors alone, so each decoder layer computes its rotary cos/sin and its mask from the
positions itself. With the router loss (models/router_loss.py) the tuple is `(hidden, P float32[E], position_ids,
C int64[E])`: floats first, because its receive buffers (`_exec_recv_activations` in runtime/pipe/engine.py
allocates `pipe_recv_buf` once) are reused by slot without checking dtype and gradient slot i shares memory with
activation slot i; a (hidden, int, float) order trained silently wrong on 3 stages. HF names (models/hf_weights.py).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from models.architecture import (
    DECODER,
    DECODER_ATTR,
    EMBEDDING,
    FINAL_NORM,
    HEAD,
    TIED_EMBEDDING_KEY,
    TIED_HEAD,
    Architecture,
    PipelineLayer,
)
from models.deepspeed_internals import DualPipeVModuleHooks, PipelineModuleHooks
from models.expert_load import StagePicks, count_picks
from models.family_verdict import rotary_arguments, scaled_embedding, scaled_logits
from models.flops import flops_partition
from models.masking import attention_mask, layer_attention_type
from models.router_loss import add_router_sums, empty_router_sums, pipeline_settings, recorded_router_logits


class EmbeddingPipe(nn.Module):
    """input_ids -> the first hidden states. Also the tied LM head's weight holder (`token_only`)."""

    def __init__(self, arch: Architecture, token_only: bool = False):
        super().__init__()
        self.token_embedding, self.position_embedding = arch.token_embedding, arch.position_embedding
        self.router_loss = arch.router_loss
        self.settings = arch.settings  # Granite's embedding multiplier, StarCoder2's embedding dropout, head scales
        # The last stage builds this module only for the tied head: it needs no positions or dropout.
        for name in (arch.token_embedding,) if token_only else arch.embedding:
            self.add_module(name, arch.new_module(f"{arch.prefix}.{name}"))

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`input_ids`, or `(input_ids, position_ids)` -> `(hidden, position_ids)`, or with the router loss
        `(hidden, P, position_ids, C)`. Without positions every row is one sequence, 0..S-1 (sampling, and callers
        that hand a bare tensor)."""
        input_ids, position_ids = inputs if isinstance(inputs, tuple | list) else (inputs, None)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        position_ids = position_ids.long().contiguous()  # p2p sends need contiguous tensors
        hidden = getattr(self, self.token_embedding)(input_ids)
        hidden = scaled_embedding(hidden, self.settings, self.training)
        for name, module in self.named_children():
            if name == self.position_embedding:
                hidden = hidden + module(position_ids)
            elif name != self.token_embedding:
                hidden = module(hidden)  # dropout
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # A frozen embedding (LoRA): a checkpointed layer after it would see an input without a gradient and
            # record nothing for its adapters (what transformers' `enable_input_require_grads` does).
            hidden.requires_grad_(True)
        if self.router_loss is None:
            return hidden, position_ids
        probs, counts = empty_router_sums(self.router_loss, hidden.device)
        return hidden, probs, position_ids, counts  # floats first: see the module's docstring

    def tied_head(self, hidden: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The tied LM head: logits from the token embedding's weight."""
        weight = getattr(self, self.token_embedding).weight
        return _on_hidden(lambda h: scaled_logits(F.linear(h, weight), self.settings), hidden)


def _on_hidden(head, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`head` applied to the hidden states; with the router loss, `(hidden, P, C)` -> `(logits, P, C)` for the loss."""
    return (head(inputs[0]), *inputs[1:]) if isinstance(inputs, tuple) else head(inputs)


class DecoderLayerPipe(nn.Module):
    """transformers' decoder layer with the (hidden, position_ids) interface of the pipeline's middle layers."""

    def __init__(self, arch: Architecture, index: int):
        super().__init__()
        self.add_module(DECODER_ATTR, arch.new_module(arch.layer_path(index)))
        self.rotary = arch.new_module(f"{arch.prefix}.{arch.rotary}") if arch.rotary else None
        self.rotary_args = rotary_arguments(self.rotary, arch.config, index)  # Gemma 3: the layer's type
        self.config, self.attention_type = arch.config, layer_attention_type(arch.config, index)
        self.router_loss = arch.router_loss
        count_picks(self, arch.experts, index)  # a MoE layer counts its expert load (models/expert_load.py)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`(hidden, position_ids)`, or with the router loss `(hidden, P, position_ids, C)`, P and C plus the sums
        of this layer's router (a dense layer passes them on)."""
        if self.router_loss is None:
            hidden, position_ids = inputs
        else:
            hidden, probs, position_ids, counts = inputs
        kwargs = {
            "position_ids": position_ids,  # flash attention's variable-length path reads the documents from these
            "attention_mask": attention_mask(self.config, self.attention_type, hidden, position_ids),
        }
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, position_ids, *self.rotary_args)
        layer = getattr(self, DECODER_ATTR)
        with recorded_router_logits(self.router_loss, layer) as router_logits:
            hidden = layer(hidden, **kwargs)  # transformers 5 layers return a tensor
        if self.router_loss is None:
            return hidden, position_ids
        for logits in router_logits:
            probs, counts = add_router_sums(self.router_loss, logits, probs, counts)
        return hidden, probs, position_ids, counts

    def _apply(self, fn, recurse=True):
        # Keep the rotary frequencies (Gemma 3: each layer type's) in fp32 when DeepSpeed casts the model to bf16:
        # only move them (HF's rotary forward upcasts `inv_freq` but cannot restore the precision a cast lost).
        buffers = dict(self.rotary.named_buffers()) if self.rotary is not None else {}
        super()._apply(fn, recurse)
        for name, fp32 in buffers.items():
            setattr(self.rotary, name, fp32.to(getattr(self.rotary, name).device))
        return self


class FinalNormPipe(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.name = arch.final_norm
        self.add_module(arch.final_norm, arch.new_module(f"{arch.prefix}.{arch.final_norm}"))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        hidden = getattr(self, self.name)(inputs[0])  # the positions end here; the router sums go on to the loss
        return hidden if len(inputs) == 2 else (hidden, inputs[1], inputs[3])


class HeadPipe(nn.Module):
    """An untied LM head (Llama-3-8B, Mistral, Pythia), holding its own weight."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.name, self.settings = arch.head, arch.settings
        self.add_module(arch.head, arch.new_module(arch.head))

    def forward(self, hidden: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return _on_hidden(lambda h: scaled_logits(getattr(self, self.name)(h), self.settings), hidden)


# The module class of each kind of layer (also what DeepSpeed's `type:` partition method matches).
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    EMBEDDING: EmbeddingPipe,
    DECODER: DecoderLayerPipe,
    FINAL_NORM: FinalNormPipe,
    HEAD: HeadPipe,
    TIED_HEAD: EmbeddingPipe,
}


def layer_spec(arch: Architecture, layer: PipelineLayer) -> LayerSpec:
    tied_weight = [f"{arch.token_embedding}.weight"]
    if layer.kind == EMBEDDING and arch.tied:
        return TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, arch, tied_weight_attr=tied_weight)
    if layer.kind == TIED_HEAD:
        return TiedLayerSpec(
            TIED_EMBEDDING_KEY,
            EmbeddingPipe,
            arch,
            token_only=True,
            forward_fn=EmbeddingPipe.tied_head,
            tied_weight_attr=tied_weight,
        )
    if layer.kind == DECODER:
        return LayerSpec(DecoderLayerPipe, arch, layer.decoder_index)
    return LayerSpec(LAYER_CLASSES[layer.kind], arch)


def layer_specs(arch: Architecture) -> list[LayerSpec]:
    """The flat list of layer specs that `PipelineModule` partitions into stages."""
    return [layer_spec(arch, layer) for layer in arch.pipeline_layers()]


class CausalLMPipeline(PipelineModuleHooks):
    """DeepSpeed's PipelineModule plus a `flops` partition method that balances compute. It partitions and builds
    the layers, no more: QLoRA's 4 bits (`models.quantize.quantize_stage`) and LoRA's adapters
    (`models.lora.add_adapters`) are applied to a built stage from outside.

    DeepSpeed balances parameters (a tied head has none on the last stage, yet does the largest matmul
    and the loss), layer counts or layer types; its `profile` method is not implemented. `flops` gives
    DeepSpeed's own balanced-partition solver per-layer costs.
    """

    SCHEDULE = "1f1b"

    def __init__(self, *args, arch: Architecture, seq_len: int, **kwargs):
        self.arch, self.seq_len = arch, seq_len
        super().__init__(*args, **kwargs)
        self.expert_picks = StagePicks(arch.experts, (layer for _, layer in self.stage_modules()))

    def forward(self, forward_input: torch.Tensor | tuple) -> torch.Tensor | tuple:
        # Training forwards count the expert load; evaluation, sampling (eval mode) and activation checkpointing's
        # recompute (during backward, outside this call) do not: models/expert_load.py.
        with self.expert_picks.counting(self.training):
            return super().forward(forward_input)

    def custom_partition(self, method: str) -> list[int] | None:
        return flops_partition(self.arch, self.seq_len, self.num_stages) if method.lower() == "flops" else None

    def check_partition(self, method: str) -> None:
        if self.parts[-2] == self.parts[-1] - 1:
            # A last stage holding only the head deadlocks DeepSpeed's first step (mismatched collectives).
            raise ValueError(
                f"partition {method!r} leaves only the LM head on the last stage "
                f"(bounds {[int(b) for b in self.parts]}); use fewer stages or --partition-method flops"
            )

    def layer_parameter_counts(self) -> list[int]:
        return self.arch.layer_parameters()  # from the meta model: nothing is built

    @torch.no_grad()
    def tied_weight_max_diff(self) -> float:
        """Largest |difference| between a stage's copy of a tied weight and the first stage's: 0.0 when the tie
        holds (and for untied models). A collective: every rank must call it."""
        device = next(self.parameters()).device
        diff = torch.zeros((), device=device)
        for mine, owner, group in self.tied_weights():
            first = mine.clone()
            dist.broadcast(first, src=owner, group=group)
            diff = torch.maximum(diff, (first - mine).abs().max().float())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()


class CausalLMDualPipeV(DualPipeVModuleHooks, CausalLMPipeline):
    """The same layers cut into 2 x ranks stages for DeepSpeed's DualPipeV schedule: rank r holds stage r and stage
    2 x ranks - 1 - r, so rank 0 holds the embedding and the head (and the loss). `num_stages` is the number of
    pipeline ranks, as for 1F1B; `deepspeed.initialize` picks `DualPipeVEngine` from this module's type."""

    SCHEDULE = "dualpipev"


# --schedule: the pipeline module class of each schedule.
SCHEDULES: dict[str, type[CausalLMPipeline]] = {cls.SCHEDULE: cls for cls in (CausalLMPipeline, CausalLMDualPipeV)}


def _seed_layer(seed: int) -> None:
    """Seed the generators a layer draws from: the CPU one (initialisation) and the device's (dropout). DeepSpeed
    calls this before every layer of every micro-batch's forward. `torch.manual_seed` would also queue lazy seeds
    for CUDA, XPU and MTIA where they are not initialised, formatting a stack trace for each: about 1 ms a call on
    CPU, 5-10% of a small model's step."""
    seed = int(seed)  # DeepSpeed hands numpy integers from its partition bounds
    torch.default_generator.manual_seed(seed)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.manual_seed(seed)


def build_pipeline(
    arch: Architecture,
    num_stages: int,
    *,
    partition_method: str = "parameters",
    seed: int = 1234,
    activation_checkpoint_interval: int = 0,
    seq_len: int | None = None,
    schedule: str = "1f1b",
    loss_fn: Callable | None = None,
    topology=None,
) -> CausalLMPipeline:
    """The model as a `PipelineModule` for `schedule` (`SCHEDULES`) on `num_stages` pipeline ranks, each layer seeded
    from (seed, layer index) whatever the layout. `loss_fn`: e.g. the preference loss (models/preference_loss.py);
    `topology`: a grid with a slice axis (models/tensor_parallel_stage.py), which then gives the stages."""
    settings = pipeline_settings(arch.router_loss)  # the loss function and the activation checkpoint function
    return SCHEDULES[schedule](
        layers=layer_specs(arch),
        num_stages=None if topology else num_stages,
        topology=topology,
        **{**settings, "loss_fn": loss_fn or settings["loss_fn"]},
        partition_method=partition_method,
        seed_layers=True,
        seed_fn=_seed_layer,
        base_seed=seed,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=[DecoderLayerPipe.__name__],
        arch=arch,
        seq_len=seq_len or arch.max_positions() or 2048,
    )
