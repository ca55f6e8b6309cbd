"""Named GPT-2 shapes, and turning `--model-config` / `--model` into a `GPT2Config`."""

from pathlib import Path

from transformers import AutoConfig, GPT2Config

# Real GPT-2 shapes (Radford et al. 2019) plus CPU-sized ones for tests and the default run.
PRESETS: dict[str, dict] = {
    "gpt2-tiny": dict(n_layer=4, n_embd=128, n_head=4, n_positions=256),
    "gpt2-small-cpu": dict(n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024),
}

# Pretraining from scratch: no dropout (as in most modern GPT-2 reproductions).
_SCRATCH_DEFAULTS = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def resolve_model_config(model_config: str | None, model: str | None, vocab_size: int | None) -> GPT2Config:
    """The model's shape: from pretrained weights (`model`), a preset name, or a config file/dir.

    `vocab_size` (the tokenizer's) sets the vocabulary of a from-scratch model; a pretrained
    model keeps its own.
    """
    if model is not None:
        config = AutoConfig.from_pretrained(model)
    elif model_config in PRESETS:
        config = GPT2Config(**PRESETS[model_config], **_SCRATCH_DEFAULTS)
    elif model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise ValueError(
                f"--model-config {model_config!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor an existing config.json or config directory"
            )
        config = GPT2Config.from_json_file(path) if path.is_file() else AutoConfig.from_pretrained(path)
    else:
        raise ValueError("give --model-config (a preset or config.json) or --model (pretrained weights)")
    if config.model_type != "gpt2":
        raise ValueError(f"only GPT-2 models are supported, got model_type={config.model_type!r}")
    if model is None and vocab_size is not None:
        config.vocab_size = vocab_size
    return config
