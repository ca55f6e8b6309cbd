"""A tiny random config of every model type transformers 5.24 maps to a causal LM, and the code's verdict on it.

The config is the config class's own defaults, shrunk (2 layers, hidden 64, vocab 128): only fields the default
config has are set, so each family keeps its own switches (soft-capping, `layer_types`, NoPE layers, biases).
The verdict is what `models.architecture.discover` decides: supported, or its one-line reason.
"""

import warnings

from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from models.architecture import discover
from models.errors import first_line

TYPES = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)  # model_type -> its causal-LM class name (196 in 5.24)
VOCAB = 128
SHRUNK = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,  # DeepSeek-style: layer 0 dense, layer 1 a mixture of experts
    n_group=1,
    topk_group=1,
    rotary_dim=8,  # GPT-J/CodeGen: rotary on half of each 16-wide head
    sliding_window=8,  # shorter than the sweep's 12-token blocks: the window shows
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# What a supported row of docs/families.md must add: the tiny config is the class's default, not every checkpoint.
NOTES = {
    "lfm2": "its default config has attention layers only; LFM2's checkpoints have `conv` layers and are refused",
}
# Fields whose default is a per-layer list, rebuilt by the config from the shrunk layer count when left out.
PER_LAYER = ("layer_types", "no_rope_layers", "mlp_only_layers")


def tiny_config(model_type: str) -> PretrainedConfig:
    """The config class's defaults, shrunk to SHRUNK where the default config has the field (head_dim: 16 where it
    is a field of its own; multi-head latent attention keeps one k/v head per query head)."""
    cls = CONFIG_MAPPING[model_type]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # configs that cannot rebuild a per-layer field log the whole config
    try:
        return _shrunk(cls)
    finally:
        hf_logging.set_verbosity(verbosity)


def _shrunk(cls: type[PretrainedConfig]) -> PretrainedConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = cls()
        names = set(default.to_dict()) | set(getattr(cls, "attribute_map", {}))
        settings = {k: v for k, v in SHRUNK.items() if k in names}
        if hasattr(default, "qk_rope_head_dim"):  # multi-head latent attention: as many k/v heads as queries
            settings.pop("num_key_value_heads", None)
        elif "head_dim" in names:
            settings["head_dim"] = 16
        for field in PER_LAYER:  # rebuilt from the layer count, where the config can set it (not a property)
            if isinstance(getattr(default, field, None), list) and not isinstance(getattr(cls, field, None), property):
                settings[field] = None
        try:
            config = cls(**settings)
        except Exception:  # noqa: BLE001 (e.g. a per-layer field it cannot rebuild): its defaults, unshrunk
            return default
        kinds = list(dict.fromkeys(getattr(default, "layer_types", None) or ()))
        if len(kinds) == 2 and len(set(config.layer_types or ())) == 1:  # 2 layers of a 5:1 pattern: one of each
            config = cls(**settings | {"layer_types": sorted(kinds, key=lambda kind: kind != default.layer_types[0])})
    return config


def verdict(model_type: str) -> str | None:
    """None when the generic conversion accepts `model_type`'s tiny config, else the reason it refuses it."""
    try:
        config = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001 (any config that cannot be built is reported as such)
        return f"its config class cannot be built with its own defaults ({type(e).__name__})"
    try:
        discover(config)
    except ValueError as e:
        return str(e).split(": ", 1)[-1].removesuffix(" (see docs/families.md)")
    except Exception as e:  # noqa: BLE001 (transformers' own code failing on a layer alone: reported as such)
        return f"transformers 5.24 does not build its model from this config ({type(e).__name__}: {first_line(e)[:60]})"
    return None
