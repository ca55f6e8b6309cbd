"""Named model shapes, and turning `--model-config` / `--model` into a transformers config.

Real shapes are those of the published `config.json`s (parameter counts as the HF model built from
the preset reports them; tests/unit/test_plan.py checks them); `*-tiny` and `gpt2-small-cpu` are
CPU-sized shapes for tests and the default run.
"""

import json
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from models.architecture import discover
from models.errors import first_line
from models.family_presets import FAMILY_PRESETS
from models.hub import check_hub_name, check_model_dir, not_found
from models.moe_presets import MOE_PRESETS


def _rope(theta: float, **scaling) -> dict:
    return {"rope_type": "llama3" if scaling else "default", "rope_theta": theta, **scaling}


def _llama3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool, rope_factor: float) -> dict:
    """Llama 3.x: 128k vocabulary, 8 k/v heads, 3.1's long-context rope scaling (3.2 1B/3B tie the head)."""
    scaling = dict(factor=rope_factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    return dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=_rope(5e5, **scaling),
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def _qwen(
    model_type: str, hidden: int, intermediate: int, *, layers: int, heads: int, kv_heads: int, tied: bool, **extra
) -> dict:
    return (
        dict(
            model_type=model_type,
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=32768,
            rope_parameters=_rope(1e6),
            rms_norm_eps=1e-6,
            tie_word_embeddings=tied,
            bos_token_id=151643,
            eos_token_id=151643,
        )
        | extra
    )


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> dict:
    """Pythia (Biderman et al. 2023): GPT-NeoX, parallel residual, rotary on a quarter of each head, untied."""
    return dict(
        model_type="gpt_neox",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


_TINY = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

QWEN3 = dict(head_dim=128, max_position_embeddings=40960)  # what Qwen3 sets beside its shape
PRESETS: dict[str, dict] = {
    # CPU-sized, for tests and the default run (vocabulary: the tokenizer's).
    "gpt2-tiny": dict(model_type="gpt2", n_layer=4, n_embd=128, n_head=4, n_positions=256),
    "gpt2-small-cpu": dict(model_type="gpt2", n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "llama-tiny": dict(model_type="llama", **_TINY),
    "mistral-tiny": dict(model_type="mistral", **_TINY, sliding_window=512),
    "qwen2-tiny": dict(model_type="qwen2", **_TINY, tie_word_embeddings=True),
    "qwen3-tiny": dict(model_type="qwen3", **_TINY, head_dim=32, tie_word_embeddings=True),
    # A mixture of experts to try on a CPU: 8 experts of 128, 2 per token, every layer sparse.
    "qwen3-moe-tiny": dict(
        model_type="qwen3_moe", **_TINY, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128
    ),
    "pythia-tiny": dict(
        model_type="gpt_neox",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=512,
        rotary_pct=0.25,
    ),
    # GPT-2 (Radford et al. 2019).
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024),
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, tied=True, rope_factor=32.0),
    "llama-3.2-3b": _llama3(3072, 8192, 28, 24, tied=True, rope_factor=32.0),
    "llama-3-8b": _llama3(4096, 14336, 32, 32, tied=False, rope_factor=8.0),
    "llama-3-70b": _llama3(8192, 28672, 80, 64, tied=False, rope_factor=8.0),
    # Mistral 7B v0.1 (4,096-token sliding window).
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_parameters=_rope(1e4),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": _qwen("qwen2", 896, 4864, layers=24, heads=14, kv_heads=2, tied=True),
    "qwen2.5-7b": _qwen("qwen2", 3584, 18944, layers=28, heads=28, kv_heads=4, tied=False, vocab_size=152064),
    "qwen3-0.6b": _qwen("qwen3", 1024, 3072, layers=28, heads=16, kv_heads=8, tied=True, **QWEN3),
    "qwen3-8b": _qwen("qwen3", 4096, 12288, layers=36, heads=32, kv_heads=8, tied=False, **QWEN3),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
    **MOE_PRESETS,
    **FAMILY_PRESETS,
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


def _config_file(path: Path, vocab_size: int | None) -> PretrainedConfig:
    """A config.json (or its folder) for a from-scratch run. With `vocab_size` (the tokenizer's), special-token ids
    the file does not set are cleared rather than left at the family's defaults (GPT-2's 50256), which lie outside
    a small vocabulary and make transformers warn on every rank; the trainer sets them from the tokenizer."""
    file = path / "config.json" if path.is_dir() else path
    try:
        settings = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--model-config {path}: cannot read {file} ({e}); pass a config.json of a supported model"
        ) from None
    if not isinstance(settings, dict) or "model_type" not in settings:
        raise ValueError(f"{path} has no model_type: add one (docs/families.md lists the supported ones)")
    if settings["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {settings['model_type']!r} is unknown to transformers")
    if vocab_size is not None:
        settings = {
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            **settings,
            "vocab_size": vocab_size,
        }
    try:
        return CONFIG_MAPPING[settings["model_type"]].from_dict(settings)
    except (StrictDataclassError, TypeError) as e:  # transformers 5 configs check their fields' types
        raise ValueError(f"--model-config {path}: {bad_field(e)}; fix {file.name}") from None


def bad_field(error: Exception) -> str:
    """The field a config refused and why, in one line ("Field 'n_layer' expected int, got str (value: '4')")."""
    cause = error.__cause__ or error
    return first_line(cause) if str(cause).strip() else first_line(error)


def _pretrained_config(model: str) -> PretrainedConfig:
    """The config of `--model`: a local save_pretrained folder (checked for weights too), or a hub name (only its
    config.json is fetched here; the ranks download the weights)."""
    if Path(model).exists():
        check_model_dir(Path(model))
    else:
        check_hub_name("--model", model)
    try:
        return AutoConfig.from_pretrained(model)
    except (StrictDataclassError, TypeError) as e:
        raise ValueError(f"--model {model}: its config.json is not valid ({bad_field(e)})") from None
    except (OSError, ValueError) as e:
        raise ValueError(not_found("--model", model, e)) from None


def resolve_model_config(
    model_config: str | None, model: str | None, vocab_size: int | None, fused_gelu: bool = True
) -> PretrainedConfig:
    """The model's shape: from pretrained weights (`model`), a preset name, or a config file/dir.

    `vocab_size` (the tokenizer's) sets the vocabulary of a from-scratch model; a pretrained model keeps
    its own. With `fused_gelu`, GPT-2's `gelu_new` becomes `gelu_pytorch_tanh`: the same tanh approximation
    (within ~3e-7) as one fused kernel instead of the ~8 elementwise kernels transformers runs `gelu_new` as.
    Raises ValueError for a family the pipeline does not support.
    """
    if model is not None:
        config = _pretrained_config(model)
    elif model_config in PRESETS:
        config = preset_config(model_config, vocab_size)
    elif model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise ValueError(
                f"--model-config {model_config!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor an existing config.json or config directory"
            )
        config = _config_file(path, vocab_size)
    else:
        raise ValueError("give --model-config (a preset or config.json) or --model (pretrained weights)")
    if fused_gelu and getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
    discover(config)  # refuses unsupported families and attention kernels
    return config
