"""Whether the generic conversion can represent a model type, decided from transformers' own classes.

No list of family names: a causal LM is supported when the pipeline's pieces (embedding stage, decoder layers
called one at a time with their rotary and mask, final norm, head) compute all that its forward computes. Two
kinds of evidence, both read from transformers 5.24's classes, never from a forward pass:

* the config: an encoder-decoder, a multimodal composite (sub-configs), or a `layer_types` entry that is not an
  attention layer (Mamba, linear attention, convolutions: a recurrent state the layer carries across tokens,
  which neither our stage interface nor transformers' one-layer call passes) is refused before anything is built;
* the forwards of the causal LM and of its base model: every `self.<name>` / `self.config.<name>` they read
  must be a piece the pipeline holds or a setting it applies (`BASE_READS`, `HEAD_READS`). A read outside
  them (an extra projection, a per-layer input, a scale it does not know) is something the pipeline would skip,
  and is the refusal's reason.
"""

import functools
import inspect
import re

import torch
from transformers import PretrainedConfig

# Settings between the pieces that the pipeline applies itself (models/pipeline.py), by config field.
EMBEDDING_SCALE = "embedding_multiplier"  # Granite: the token embedding times this
EMBEDDING_DROPOUT = "embedding_dropout"  # StarCoder2: dropout on the token embedding (training only)
HEAD_SCALES = ("logit_scale", "logits_scaling", "final_logit_softcapping")  # Cohere x, Granite /, Gemma 2/3 cap
# Config flags that change a forward the pipeline does not reproduce when they are on.
REFUSED_FLAGS = {
    "use_bidirectional_attention": "bidirectional attention (an encoder's mask)",
    "add_cross_attention": "cross-attention to an encoder",
}
# What a base model's forward may read: its pieces (names found on the model), the layer loop and the masks.
BASE_READS = {
    "config",
    "num_hidden_layers",
    "layer_types",  # each layer's mask and rotary (masking.py, DecoderLayerPipe)
    "has_sliding_layers",  # which masks to build: masking.py builds each layer's own
    "sliding_window",
    "gradient_checkpointing",
    "training",
    "warn_if_padding_and_no_attention_mask",  # padding checks: a pipeline block has no padding mask
    EMBEDDING_SCALE,
    EMBEDDING_DROPOUT,
    *REFUSED_FLAGS,  # read, and refused when on (config_refusal)
}
# What a causal LM's forward may read: its base model, head and loss, and the router loss (models/router_loss.py).
HEAD_READS = {
    "loss_function",
    "vocab_size",
    "output_router_logits",
    "num_experts",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    *HEAD_SCALES,
}
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the masks models/masking.py builds
STATEFUL_LAYER_TYPES = {"linear_attention", "conv", "mamba", "mamba2", "recurrent", "rwkv"}
_READ = re.compile(r"self\.config\.(\w+)|self\.(\w+)")


def config_refusal(config: PretrainedConfig) -> str | None:
    """Why `config`'s model cannot be a pipeline of decoder layers, from the config alone (None: no reason yet)."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder: the decoder attends to an encoder's output"
    subs = sorted(getattr(config, "sub_configs", None) or ())
    if subs:
        return _composite_refusal(subs)
    kinds = set(map(str, getattr(config, "layer_types", None) or ())) - ATTENTION_LAYER_TYPES
    if kinds & STATEFUL_LAYER_TYPES:
        return (
            f"stateful layers ({', '.join(sorted(kinds & STATEFUL_LAYER_TYPES))}): a recurrent or convolutional "
            "state carried across tokens, which a decoder layer called alone on (hidden, positions) does not receive"
        )
    if kinds:
        return (
            f"layer kinds other than full or sliding-window attention ({', '.join(sorted(kinds))}), whose masks or "
            "key selection the pipeline's per-layer masks (models/masking.py) do not build"
        )
    on = [why for flag, why in REFUSED_FLAGS.items() if getattr(config, flag, False)]
    return on[0] if on else None


def _composite_refusal(subs: list[str]) -> str:
    """The reason for a config made of sub-configs, by what they are."""
    names = ", ".join(subs)
    if any(word in sub for sub in subs for word in ("vision", "audio", "vq", "image")):
        return f"multimodal composite ({names}): use its text-only model type where transformers has one"
    if set(subs) <= {"attn_config", "ffn_config"}:
        return f"its settings are nested in sub-configs ({names}), which the conversion's config reads do not enter"
    if subs == ["text_config"]:
        return "a wrapper around a language model's config (text_config) whose forward takes more than token ids"
    return f"a composite of several models ({names}), not one stack of decoder layers"


def forward_refusal(model, pieces: set[str]) -> str | None:
    """Why the pipeline would not compute `model`'s forward: a read of its own or its base model's forward that
    is not one of the pipeline's `pieces` (child names) nor a setting it applies (None: none)."""
    base = model.base_model
    extra = _reads(type(base)) - pieces - BASE_READS
    if extra:
        return f"its base model's forward also uses {', '.join(sorted(extra))}, which the pipeline does not apply"
    extra = _reads(type(model)) - {model.base_model_prefix, *pieces} - HEAD_READS
    if extra:
        return f"its causal LM's forward also uses {', '.join(sorted(extra))}, which the pipeline does not apply"
    return None


def order_refusal(base, layers: str, final_norm: str) -> str | None:
    """Why the module taken for the final norm is not one (None: it is): the pipeline applies it after the last
    layer, so the base model's forward must call it only after its loop over the layers (nanochat also normalises
    the embeddings with it before the layers)."""
    source = inspect.getsource(type(base).forward)
    loop, call = source.find(f"self.{layers}"), source.find(f"self.{final_norm}(")
    if 0 <= call < loop:
        return f"its base model's forward calls {final_norm} before its layers too, not only after them"
    return None


@functools.cache
def _reads(cls: type) -> frozenset[str]:
    """The names a class's forward reads off `self` (or `self.config`), from its source."""
    return frozenset(a or b for a, b in _READ.findall(inspect.getsource(cls.forward)))


def applied_settings(model) -> tuple[tuple[str, float], ...]:
    """The settings between the pieces that `model`'s forwards apply (read and not None), as (field, value)."""
    reads = _reads(type(model.base_model)) | _reads(type(model))
    fields = [f for f in (EMBEDDING_SCALE, EMBEDDING_DROPOUT, *HEAD_SCALES) if f in reads]
    return tuple((f, float(getattr(model.config, f))) for f in fields if getattr(model.config, f, None) is not None)


def scaled_embedding(hidden, settings: tuple[tuple[str, float], ...], training: bool):
    """The token embedding as the base model's forward transforms it before the layers (transformers 5.24: Granite
    multiplies by `embedding_multiplier`, StarCoder2 applies dropout `embedding_dropout`)."""
    values = dict(settings)
    if EMBEDDING_SCALE in values:
        hidden = hidden * values[EMBEDDING_SCALE]
    if values.get(EMBEDDING_DROPOUT):
        hidden = torch.nn.functional.dropout(hidden, p=values[EMBEDDING_DROPOUT], training=training)
    return hidden


def scaled_logits(logits, settings: tuple[tuple[str, float], ...]):
    """The head's logits as the causal LM's forward transforms them (transformers 5.24: Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3 soft-cap: cap x tanh(logits / cap))."""
    values = dict(settings)
    if "logit_scale" in values:
        logits = logits * values["logit_scale"]
    if "logits_scaling" in values:
        logits = logits / values["logits_scaling"]
    if "final_logit_softcapping" in values:
        cap = values["final_logit_softcapping"]
        logits = torch.tanh(logits / cap) * cap
    return logits


def rotary_arguments(rotary, config: PretrainedConfig, index: int) -> tuple[str, ...]:
    """What a decoder layer's rotary module takes after (hidden, positions): Gemma 3's keeps one frequency table
    per layer type (local theta 1e4, global 1e6 with its scaling) and takes the layer's type (transformers 5.24)."""
    if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
        return (config.layer_types[index],)
    return ()
