"""What a Hugging Face causal LM is made of, read from the model's own structure.

One description serves every family: the model is built on the meta device (no memory, ~1 s for
70B) from its config, and its pieces are found the way transformers itself finds them:
`base_model_prefix` and `base_model` for the decoder, the one `nn.ModuleList` in it for the
decoder layers, `get_input_embeddings` / `get_output_embeddings` for the token embedding and the
LM head, `tie_word_embeddings` (checked against the built model) for the tie. What stands before the
layers (token and position embeddings, dropout) forms the embedding stage, the module after them
with parameters is the final norm, and a `...RotaryEmbedding` is recomputed inside every decoder
layer (Gemma 3's for the layer's type) so that only the hidden states and the integer positions travel between
stages. Whether a model type is supported at all is decided from its classes, not a list of names
(models/family_verdict.py); settings its forwards apply between the pieces (logit soft-cap and scales, embedding
multiplier) are read from the config into `Architecture.settings`.

A pipeline layer gets a real copy of one piece: deep-copied from the meta model, allocated, and
initialised by the family's own `_init_weights` (which also recomputes rotary frequencies).
"""

import copy
import functools
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from models.errors import first_line
from models.expert_load import ExpertLayers, expert_layers_of
from models.family_verdict import applied_settings, config_refusal, forward_refusal, order_refusal
from models.router_loss import RouterLoss, router_loss_of

# DeepSpeed's key of the tied embedding (TiedLayerSpec): its parameters are named `tied_modules.embed.<name>`.
TIED_EMBEDDING_KEY = "embed"
# The kinds of pipeline layer, in the order `Architecture.pipeline_layers` lists them.
EMBEDDING, DECODER, FINAL_NORM, HEAD, TIED_HEAD = "embedding", "decoder", "final_norm", "head", "tied_head"
# The attribute under which a decoder pipeline layer holds transformers' decoder layer (`layer.self_attn...`).
DECODER_ATTR = "layer"
# Attention kernels that are causal when called without a mask (eager is not: it attends to the future).
CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PipelineLayer:
    """One layer of the pipeline's flat layer list: its kind and the HF modules it holds (full paths).

    A layer keeps each module under the module's own name (`wte`, `ln_f`, `lm_head`), except a decoder layer,
    which keeps transformers' layer as `DECODER_ATTR`; so a name inside the layer and its HF name differ by one
    prefix (`prefixes`), renamed one way by `hf_key` and the other by `local_name`."""

    kind: str  # EMBEDDING, DECODER, FINAL_NORM, HEAD or TIED_HEAD
    modules: tuple[str, ...]  # e.g. ("transformer.wte", "transformer.wpe", "transformer.drop"), ("model.layers.3",)
    parameters: int  # as DeepSpeed counts them: a tied head counts its own copy of the token embedding
    decoder_index: int | None = None  # the decoder layer's index in the HF model

    def prefixes(self) -> tuple[str, str]:
        """(prefix inside the pipeline layer, HF prefix): the one table of this layer's names; "" is no prefix."""
        if self.kind == DECODER:
            return DECODER_ATTR, self.modules[0]
        if self.kind == TIED_HEAD:
            raise ValueError("the tied LM head has no parameters of its own (it uses the token embedding's)")
        return "", self.modules[0].rpartition(".")[0]  # the decoder (embedding, final norm) or the model (head)

    def hf_key(self, name: str) -> str:
        """HF name (state-dict key) of the parameter or module `name` of this layer."""
        return _renamed(name, *self.prefixes())

    def local_name(self, hf_name: str) -> str:
        """The name, inside this layer, of its HF parameter or module `hf_name` (the inverse of `hf_key`)."""
        return _renamed(hf_name, *reversed(self.prefixes()))


def _renamed(name: str, old: str, new: str) -> str:
    """`name` with its prefix `old` replaced by `new` (dotted prefixes; "" is none)."""
    rest = name.removeprefix(f"{old}.") if old else name
    return f"{new}.{rest}" if new else rest


@dataclass(frozen=True)
class Architecture:
    """Names of a model's pieces, relative to the causal-LM model (`prefix` is the decoder's)."""

    config: PretrainedConfig  # attention forced to a kernel that is causal without a mask
    prefix: str  # "model", "transformer", "gpt_neox"
    layers: str  # the decoder-layer list inside the decoder: "layers", "h"
    embedding: tuple[str, ...]  # the decoder's modules before the layers, in order: ("wte", "wpe", "drop")
    token_embedding: str  # "embed_tokens", "wte", "embed_in"
    position_embedding: str | None  # learned absolute positions ("wpe"), added to the token embedding
    final_norm: str  # "norm", "ln_f", "final_layer_norm"
    rotary: str | None  # "rotary_emb", recomputed in every decoder layer
    head: str  # the LM head, a child of the causal-LM model: "lm_head"
    tied: bool  # the head uses the token embedding's weight
    router_loss: RouterLoss | None = None  # the load-balancing loss the causal LM adds (output_router_logits)
    experts: ExpertLayers | None = None  # a mixture of experts' MoE layers, whose expert load is counted
    # Settings the model's forwards apply between the pieces, by config field (models/family_verdict.py):
    # Granite's embedding_multiplier, StarCoder2's embedding_dropout; Cohere's logit_scale, Granite's logits_scaling,
    # Gemma 2/3's final_logit_softcapping.
    settings: tuple[tuple[str, float], ...] = ()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def attention_width(self) -> float:
        """Query heads x head size (the hidden size, except where `head_dim` says otherwise): the width of QK^T and
        AV. Multi-head latent attention (DeepSeek-V2/V3) scores with `qk_head_dim` (nope + rope, 192 in V3) and
        mixes values of `v_head_dim` (128), and sets `head_dim` to the rope part alone (transformers 5.24): its
        width is heads x the mean of the two, so that 12 x width x seq counts both products."""
        config, heads = self.config, self.config.num_attention_heads
        if getattr(config, "qk_head_dim", None) and getattr(config, "v_head_dim", None):
            return heads * (config.qk_head_dim + config.v_head_dim) / 2
        return heads * (getattr(config, "head_dim", None) or self.hidden_size // heads)

    def meta_model(self) -> nn.Module:
        return meta_model(self.config)

    def new_module(self, path: str) -> nn.Module:
        """A real, initialised copy of the model's submodule at `path` (e.g. "model.layers.3")."""
        model = self.meta_model()
        module = copy.deepcopy(model.get_submodule(path)).to_empty(device="cpu")
        module.apply(model._init_weights)  # children first, as HF does: GPT-2's scaled c_proj wins
        return module

    def parameters_of(self, path: str) -> int:
        return sum(p.numel() for p in self.meta_model().get_submodule(path).parameters())

    def pipeline_layers(self) -> list[PipelineLayer]:
        """The pipeline's layers in order, the one place that order is written: the embedding stage, the decoder
        layers, the final norm, the LM head (tied: the token embedding again). Specs, weight names, FLOPs,
        parameter counts and the planner's memory model all read this list."""
        return list(self._pipeline_layers)

    @functools.cached_property
    def _pipeline_layers(self) -> tuple[PipelineLayer, ...]:  # the instance is frozen: computed once
        embedding = tuple(f"{self.prefix}.{name}" for name in self.embedding)
        token = f"{self.prefix}.{self.token_embedding}"
        norm = f"{self.prefix}.{self.final_norm}"
        return (
            PipelineLayer(EMBEDDING, embedding, sum(self.parameters_of(path) for path in embedding)),
            *[
                PipelineLayer(DECODER, (path,), self.parameters_of(path), decoder_index=i)
                for i, path in ((i, self.layer_path(i)) for i in range(self.num_layers))
            ],
            PipelineLayer(FINAL_NORM, (norm,), self.parameters_of(norm)),
            PipelineLayer(TIED_HEAD, (token,), self.parameters_of(token))
            if self.tied
            else PipelineLayer(HEAD, (self.head,), self.parameters_of(self.head)),
        )

    def layer_parameters(self) -> list[int]:
        """Parameters of every pipeline layer as DeepSpeed counts them for `parameters` partitioning (a tied head
        counts its copy of the token embedding, so the model has all but the last)."""
        return [layer.parameters for layer in self.pipeline_layers()]

    def parameters(self) -> int:
        counts = self.layer_parameters()
        return sum(counts[:-1]) if self.tied else sum(counts)

    def layer_path(self, index: int) -> str:
        return f"{self.prefix}.{self.layers}.{index}"

    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear layer computing x @ W, its weight stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """A linear layer as transformers builds them: `nn.Linear`, or GPT-2's `Conv1D` (its weight transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


_META_MODELS: dict[str, nn.Module] = {}


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal-LM model of `config` on the meta device (kept: pipeline layers copy their pieces from it)."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str) + str(config._attn_implementation)
    if key not in _META_MODELS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
        _META_MODELS[key] = model
    return _META_MODELS[key]


def pipeline_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of `config` whose attention is causal when a decoder layer is called alone, with no mask.

    A standalone layer built from a raw config falls back to eager attention, which without a mask
    attends to future tokens. SDPA (and flash attention) with no mask take `is_causal=True`, which is
    what the whole model computes for unpadded blocks. A flash kernel the user asked for is kept.
    A family without SDPA (gpt-oss: its attention sinks) runs eager, as transformers does: masking.py
    then gives every layer an explicit mask, since transformers' eager mask is never skipped.
    """
    config = copy.deepcopy(config)
    requested = getattr(config, "_attn_implementation", None)
    without_sdpa = not getattr(AutoModelForCausalLM._model_mapping.get(type(config), None), "_supports_sdpa", True)
    if without_sdpa and requested in (None, "eager"):
        config._attn_implementation = "eager"
        return config
    if requested not in (None, *CAUSAL_WITHOUT_MASK):
        raise ValueError(
            f"the model config asks for {requested!r} attention, which attends to future tokens without a mask; "
            "remove attn_implementation from it (pipegpt uses sdpa) or set it to sdpa or flash_attention_2"
        )
    config._attn_implementation = requested or "sdpa"
    return config


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, module in parent.named_children() if module is child)


def discover(config: PretrainedConfig) -> Architecture:
    """The `Architecture` of `config`'s causal-LM model, or a ValueError naming why the generic conversion cannot
    represent it (models/family_verdict.py: no list of names; docs/families.md lists every model type's verdict)."""
    model_type = config.model_type
    refusal = config_refusal(config)
    if refusal:
        raise _refused(model_type, refusal)
    config = pipeline_config(config)
    try:
        model = meta_model(config)
    except (ValueError, ImportError) as e:  # e.g. a model without SDPA, or flash attention not installed
        raise ValueError(
            f"{model_type} cannot run with {config._attn_implementation} attention ({first_line(e)}); "
            "pipegpt needs an attention kernel that is causal without a mask (sdpa or flash attention), not eager"
        ) from None
    return _architecture(model_type, config, model)


def _refused(model_type: str, reason: str) -> ValueError:
    return ValueError(f"model_type {model_type!r} is not supported: {reason} (see docs/families.md)")


def _architecture(model_type: str, config: PretrainedConfig, model: nn.Module) -> Architecture:
    base = model.base_model
    children = dict(base.named_children())
    lists = [name for name, module in children.items() if isinstance(module, nn.ModuleList)]
    if len(lists) != 1:
        raise _refused(model_type, f"its base model holds {len(lists)} lists of layers, not one ({list(children)})")
    (layers,) = lists
    order = list(children)
    before, after = order[: order.index(layers)], order[order.index(layers) + 1 :]
    token = _child_name(base, model.get_input_embeddings())
    rotary = [n for n in before + after if type(children[n]).__name__.endswith("RotaryEmbedding")]
    positions = [n for n in before if n != token and isinstance(children[n], nn.Embedding)]
    norms = [n for n in after if n not in rotary]  # OLMo's and nanochat's final norms have no weight
    norms = [n for n in norms if any(True for _ in children[n].parameters())] if len(norms) > 1 else norms
    if len(norms) != 1 or len(rotary) > 1 or len(positions) > 1:
        raise _refused(model_type, f"cannot tell the final norm, rotary and position embeddings apart in {order}")
    head_module = model.get_output_embeddings()
    refusal = forward_refusal(model, set(children) | {_child_name(model, head_module)})
    refusal = refusal or order_refusal(base, layers, norms[0])
    if refusal:
        raise _refused(model_type, refusal)
    return Architecture(
        config=config,
        prefix=model.base_model_prefix,
        layers=layers,
        embedding=tuple(n for n in before if n not in rotary),
        token_embedding=token,
        position_embedding=positions[0] if positions else None,
        final_norm=norms[0],
        rotary=rotary[0] if rotary else None,
        head=_child_name(model, head_module),
        tied=head_module.weight is model.get_input_embeddings().weight,
        router_loss=router_loss_of(model),
        experts=expert_layers_of(children[layers], getattr(config, "num_experts_per_tok", None)),
        settings=applied_settings(model),
    )


def ranges_text(ranges: list[tuple[int, int]] | list[list[int]]) -> str:
    """[start, stop) layer ranges as people read them: "0-1 and 5-6"."""
    return " and ".join(f"{start}-{stop - 1}" for start, stop in ranges)
