"""Named model shapes, and turning `--model-config` / `--model` into a transformers config.

Real shapes are those of the published `config.json`s (parameter counts as the HF model built from
the preset reports them; tests/test_presets.py checks them); `*-tiny` and `gpt2-small-cpu` are
CPU-sized shapes for tests and the default run.
"""

import json
from pathlib import Path

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from models.architecture import SUPPORTED_FAMILIES, discover


def _rope(theta: float, **scaling) -> dict:
    return {"rope_type": "llama3" if scaling else "default", "rope_theta": theta, **scaling}


_LLAMA3_SCALING = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
               num_key_value_heads=8, bos_token_id=128000, eos_token_id=128001)  # fmt: skip
_QWEN = dict(vocab_size=151936, max_position_embeddings=32768, rope_parameters=_rope(1e6), rms_norm_eps=1e-6,
             bos_token_id=151643, eos_token_id=151643)  # fmt: skip
_PYTHIA = dict(model_type="gpt_neox", vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
               use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)  # fmt: skip
_TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip

PRESETS: dict[str, dict] = {
    # CPU-sized, for tests and the default run (vocabulary: the tokenizer's).
    "gpt2-tiny": dict(model_type="gpt2", n_layer=4, n_embd=128, n_head=4, n_positions=256),
    "gpt2-small-cpu": dict(model_type="gpt2", n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "llama-tiny": dict(model_type="llama", **_TINY),
    "mistral-tiny": dict(model_type="mistral", **_TINY, sliding_window=512),
    "qwen2-tiny": dict(model_type="qwen2", **_TINY, tie_word_embeddings=True),
    "qwen3-tiny": dict(model_type="qwen3", **_TINY, head_dim=32, tie_word_embeddings=True),
    "pythia-tiny": dict(model_type="gpt_neox", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25),  # fmt: skip
    # GPT-2 (Radford et al. 2019).
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024),
    # Llama 3.x (3.1's long-context rope scaling; 3.2 1B/3B tie the head).
    "llama-3.2-1b": dict(**_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, tie_word_embeddings=True,
                         rope_parameters=_rope(5e5, factor=32.0, **_LLAMA3_SCALING)),  # fmt: skip
    "llama-3.2-3b": dict(**_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, tie_word_embeddings=True,
                         rope_parameters=_rope(5e5, factor=32.0, **_LLAMA3_SCALING)),  # fmt: skip
    "llama-3-8b": dict(**_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, tie_word_embeddings=False,
                       rope_parameters=_rope(5e5, factor=8.0, **_LLAMA3_SCALING)),  # fmt: skip
    "llama-3-70b": dict(**_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, tie_word_embeddings=False,
                        rope_parameters=_rope(5e5, factor=8.0, **_LLAMA3_SCALING)),  # fmt: skip
    # Mistral 7B v0.1 (4,096-token sliding window).
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, rope_parameters=_rope(1e4),
                       rms_norm_eps=1e-5, tie_word_embeddings=False),  # fmt: skip
    # Qwen2.5 and Qwen3.
    "qwen2.5-0.5b": dict(model_type="qwen2", **_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),  # fmt: skip
    "qwen2.5-7b": dict(model_type="qwen2", **{**_QWEN, "vocab_size": 152064}, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),  # fmt: skip
    "qwen3-0.6b": dict(model_type="qwen3", **{**_QWEN, "max_position_embeddings": 40960}, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True),  # fmt: skip
    "qwen3-8b": dict(model_type="qwen3", **{**_QWEN, "max_position_embeddings": 40960}, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=False),  # fmt: skip
    # Pythia (Biderman et al. 2023): GPT-NeoX, parallel residual, rotary on a quarter of each head.
    "pythia-70m": dict(**_PYTHIA, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
    "pythia-160m": dict(**_PYTHIA, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12),  # fmt: skip
    "pythia-410m": dict(**_PYTHIA, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16),  # fmt: skip
    "pythia-1b": dict(**_PYTHIA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8),
    "pythia-1.4b": dict(**_PYTHIA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=16),  # fmt: skip
    "pythia-2.8b": dict(**_PYTHIA, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                        num_attention_heads=32),  # fmt: skip
    "pythia-6.9b": dict(**{**_PYTHIA, "vocab_size": 50432}, hidden_size=4096, intermediate_size=16384,
                        num_hidden_layers=32, num_attention_heads=32),  # fmt: skip
    "pythia-12b": dict(**{**_PYTHIA, "vocab_size": 50688}, hidden_size=5120, intermediate_size=20480,
                       num_hidden_layers=36, num_attention_heads=40),  # fmt: skip
}

# Pretraining from scratch: no dropout (as in most modern reproductions; GPT-2's config defaults to 0.1).
_SCRATCH_DEFAULTS = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def preset_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The config of preset `name`; `vocab_size` (a tokenizer's) replaces the preset's vocabulary, and then
    the special-token ids, which belong to the preset's tokenizer, are cleared."""
    settings = {**PRESETS[name]}
    model_type = settings.pop("model_type")
    settings.update(_SCRATCH_DEFAULTS.get(model_type, {}))
    if vocab_size is not None or "vocab_size" not in settings:
        settings.update(vocab_size=vocab_size or 50257, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CONFIG_MAPPING[model_type](**settings)


def _config_file(path: Path) -> PretrainedConfig:
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    settings = json.loads(path.read_text())
    if "model_type" not in settings:
        raise ValueError(f"{path} has no model_type: add one of {', '.join(SUPPORTED_FAMILIES)}")
    if settings["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {settings['model_type']!r} is unknown to transformers")
    return CONFIG_MAPPING[settings["model_type"]].from_dict(settings)


def resolve_model_config(model_config: str | None, model: str | None, vocab_size: int | None) -> PretrainedConfig:
    """The model's shape: from pretrained weights (`model`), a preset name, or a config file/dir.

    `vocab_size` (the tokenizer's) sets the vocabulary of a from-scratch model; a pretrained model keeps
    its own. Raises ValueError for a family the pipeline does not support.
    """
    if model is not None:
        config = AutoConfig.from_pretrained(model)
    elif model_config in PRESETS:
        config = preset_config(model_config, vocab_size)
    elif model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise ValueError(
                f"--model-config {model_config!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor an existing config.json or config directory"
            )
        config = _config_file(path)
        if vocab_size is not None:
            config.vocab_size = vocab_size
    else:
        raise ValueError("give --model-config (a preset or config.json) or --model (pretrained weights)")
    discover(config)  # refuses unsupported families and attention kernels
    return config
