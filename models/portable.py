"""What we hand to other tools reads the same in transformers 4.x and 5.x: the last touch on every folder we write
for them (the run's `tokenizer/`, the export's `hf/`, a PEFT `adapter/`, a merged model).

transformers 5.24 writes files that the last 4.x release (4.57.1, still pinned by much of the ecosystem:
serving engines, evaluation harnesses, older trainers) misreads, measured here against both:

- `tokenizer_config.json` names the class `TokenizersBackend`, which 4.x does not have ("Tokenizer class
  TokenizersBackend does not exist"); `PreTrainedTokenizerFast` is the same fast tokenizer in both (5.x keeps the
  name as an alias). A model's own class (`LlamaTokenizer`, ...) is left alone: 4.x picks its fast variant. Its
  `extra_special_tokens` list (added special tokens such as ChatML's) is 4.x's `additional_special_tokens`: 4.x
  takes `extra_special_tokens` for a dict of named tokens and fails on a list ('list' object has no attribute
  'keys'); 5.x reads either name.
- `model_max_length` is 1e30 when the tokenizer came without one (a trained BPE): `pipeline()` then feeds a
  prompt longer than the positions into the model (`IndexError`) and `truncation=True` cuts nothing. It becomes
  the model's context.
- `config.json` holds the rotary settings only as `rope_parameters`; 4.x reads `rope_theta`, `rope_scaling` (and
  GPT-NeoX's `rotary_pct`/`rotary_emb_base`, Phi-3's `partial_rotary_factor`) and silently falls back to their
  defaults: a Llama 3 rope-scaled export ran at theta 10,000 without scaling (logits off by 0.12), a Pythia with
  half-rotary heads at a quarter (0.11). The 4.x keys are added beside `rope_parameters`; 5.x reads
  `rope_parameters` first and gives the same model (tests/integration/test_portable.py checks both).
- `generation_config.json` without a `pad_token_id` makes every `generate` call warn and guess; it gets the
  first EOS, as `generate` would pick.
- safetensors 0.8 creates its files owner-only (0600) whatever the umask: a team's shared model folder would be
  unreadable to the team. Every file gets the permissions the user's umask gives a new file.
"""

import json
import os
from pathlib import Path

LEGACY_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def max_positions(config: dict) -> int | None:
    return config.get("max_position_embeddings") or config.get("n_positions")


def legacy_rope_keys(config: dict) -> dict:
    """The keys transformers 4.x reads for the rotary settings in `config["rope_parameters"]` (5.x's name)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    keys: dict = {"rope_theta": rope["rope_theta"]}
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    keys["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if "partial_rotary_factor" in rope:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if config.get("model_type") == "gpt_neox":
            keys["rotary_pct"] = rope["partial_rotary_factor"]
    if config.get("model_type") == "gpt_neox":
        keys["rotary_emb_base"] = rope["rope_theta"]
    return keys


def _update_json(path: Path, update) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    new = update(data)
    if new != data:
        path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def _tokenizer_config(data: dict, context: int | None) -> dict:
    data = dict(data)
    if isinstance(data.get("extra_special_tokens"), list):  # 4.x: a dict of named tokens; the list is this
        data["additional_special_tokens"] = data.pop("extra_special_tokens")
    data["tokenizer_class"] = LEGACY_TOKENIZER_CLASS.get(data.get("tokenizer_class"), data.get("tokenizer_class"))
    length = data.get("model_max_length")
    if context is not None and (length is None or length > context):
        data["model_max_length"] = context
    return data


def _generation_config(data: dict) -> dict:
    eos = data.get("eos_token_id")
    if data.get("pad_token_id") is None and eos is not None:
        return {**data, "pad_token_id": eos[0] if isinstance(eos, list) else eos}
    return data


def make_portable(folder: Path, context: int | None = None) -> Path:
    """Rewrite what transformers 4.x would misread in `folder` (see the module docstring) and give its files the
    umask's permissions. `context`: the model's positions, for a tokenizer folder without a config.json."""
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        context = context or max_positions(config)
        _update_json(config_path, lambda data: {**data, **legacy_rope_keys(data)})
    _update_json(folder / "tokenizer_config.json", lambda data: _tokenizer_config(data, context))
    _update_json(folder / "generation_config.json", _generation_config)
    share_as_umask(folder)
    return folder


def share_as_umask(folder: Path) -> None:
    """Every file below `folder` readable (and writable) as the umask allows a new file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
