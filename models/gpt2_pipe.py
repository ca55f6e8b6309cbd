"""GPT-2 as a list of DeepSpeed pipeline layers.

The pipeline is the flat sequence

    layer 0        EmbeddingPipe   (token + position embedding; tied key "embed")
    layer 1..n     BlockPipe       (transformers' own GPT2Block, one per layer)
    layer n+1      FinalNormPipe   (ln_f)
    layer n+2      tied LM head    (the same "embed" module, used as F.linear(h, wte.weight))

Every parameter keeps the name it has inside `GPT2LMHeadModel` once the layer's
prefix is put back (see `models/hf_weights.py`), so converting weights is a
renaming.
"""

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from models.flops import flops_partition
from models.loss import next_token_cross_entropy

TIED_EMBEDDING_KEY = "embed"


def pipeline_config(config: GPT2Config) -> GPT2Config:
    """A copy of `config` whose attention is causal when a block is called alone.

    A standalone GPT2Block gets no mask from us; with eager attention it then
    attends to future tokens. SDPA with no mask takes `is_causal=True`, which is
    exactly what `GPT2Model` computes for unpadded blocks.
    """
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


def init_gpt2_weights(module: nn.Module, config: GPT2Config) -> None:
    """GPT-2's initialisation (as `GPT2PreTrainedModel._init_weights`), for from-scratch runs."""
    std = config.initializer_range
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "ln_" in name:
            nn.init.ones_(param) if leaf == "weight" else nn.init.zeros_(param)
        elif leaf == "bias":
            nn.init.zeros_(param)
        elif name.endswith("c_proj.weight"):
            # GPT-2 scales residual projections by 1/sqrt(2 * n_layer).
            nn.init.normal_(param, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        else:
            nn.init.normal_(param, mean=0.0, std=std)


class EmbeddingPipe(nn.Module):
    """input_ids -> token + position embeddings. Also the tied LM head's weight holder."""

    def __init__(self, config: GPT2Config, with_positions: bool = True):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # The last stage builds this module only for the tied head: it needs no positions.
        if with_positions:
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        init_gpt2_weights(self, config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


def lm_head_forward(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head: logits from the tied token embedding (GPT-2 has no separate head weight)."""
    return F.linear(hidden, embedding.wte.weight)


class BlockPipe(GPT2Block):
    """transformers' GPT2Block with the one-tensor-in, one-tensor-out interface of a pipeline layer."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__(pipeline_config(config), layer_idx=layer_idx)
        init_gpt2_weights(self, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)


class FinalNormPipe(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)


def gpt2_layer_specs(config: GPT2Config) -> list[LayerSpec]:
    """The flat list of layer specs that `PipelineModule` partitions into stages."""
    return [
        TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, config, tied_weight_attr=["wte.weight"]),
        *[LayerSpec(BlockPipe, config, i) for i in range(config.n_layer)],
        LayerSpec(FinalNormPipe, config),
        TiedLayerSpec(
            TIED_EMBEDDING_KEY,
            EmbeddingPipe,
            config,
            with_positions=False,
            forward_fn=lm_head_forward,
            tied_weight_attr=["wte.weight"],
        ),
    ]


class GPT2Pipeline(PipelineModule):
    """DeepSpeed's PipelineModule plus a `flops` partition method that balances compute.

    DeepSpeed balances parameters (the tied head has none on the last stage, yet does the
    largest matmul and the loss), layer counts or layer types; its `profile` method is not
    implemented. `flops` gives DeepSpeed's own balanced-partition solver per-layer costs.
    """

    def __init__(self, *args, config: GPT2Config, seq_len: int, **kwargs):
        self.config, self.seq_len = config, seq_len
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if method.lower() == "flops":
            self.parts = flops_partition(self.config, self.seq_len, self.num_stages)
            self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])
        else:
            super()._partition_layers(method)
        if self.parts[-2] == len(self._layer_specs) - 1:
            # Only replicated tied weights on the last stage deadlock DeepSpeed's first step.
            raise ValueError(
                f"partition {method!r} leaves only the tied LM head on the last stage "
                f"(bounds {[int(b) for b in self.parts]}); use fewer stages or --partition-method flops"
            )

    @torch.no_grad()
    def _synchronize_tied_weights(self) -> None:
        # DeepSpeed broadcasts the tied embedding with grad enabled, which records the in-place
        # broadcast in autograd and makes every backward warn; the broadcast is not differentiable.
        super()._synchronize_tied_weights()

    @torch.no_grad()
    def tied_weight_max_diff(self) -> float:
        """Largest |difference| between a stage's copy of a tied weight and the first stage's.

        0.0 when the tie holds. A collective: every rank must call it.
        """
        device = next(self.parameters()).device
        diff = torch.zeros((), device=device)
        for comm in self.tied_comms.values():
            for attr in comm["weight_attr"]:
                mine = self._recursive_getattr(comm["module"], attr)
                first = mine.clone()
                dist.broadcast(first, src=min(comm["ranks"]), group=comm["group"])
                diff = torch.maximum(diff, (first - mine).abs().max().float())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()


def _seed_layer(seed: int) -> None:
    """Seed the generators a layer draws from: the CPU one (initialisation) and the device's (dropout).

    DeepSpeed calls this before every layer of every micro-batch's forward. `torch.manual_seed` would also
    queue lazy seeds for CUDA, XPU and MTIA where they are not initialised, formatting a stack trace for
    each: about 1 ms a call on CPU, 5-10% of a small model's step."""
    seed = int(seed)  # DeepSpeed hands numpy integers from its partition bounds
    torch.default_generator.manual_seed(seed)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.manual_seed(seed)


def build_gpt2_pipeline(
    config: GPT2Config,
    num_stages: int,
    partition_method: str = "parameters",
    seed: int = 1234,
    activation_checkpoint_interval: int = 0,
    seq_len: int | None = None,
) -> GPT2Pipeline:
    """GPT-2 as a `PipelineModule`. Each layer is seeded from (seed, layer index), so the
    initial weights are the same whatever the number of stages."""
    return GPT2Pipeline(
        layers=gpt2_layer_specs(config),
        num_stages=num_stages,
        loss_fn=next_token_cross_entropy,
        partition_method=partition_method,
        seed_layers=True,
        seed_fn=_seed_layer,
        base_seed=seed,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=[BlockPipe.__name__],
        config=config,
        seq_len=seq_len or config.n_positions,
    )
