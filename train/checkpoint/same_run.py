"""A resume is the same run: what a checkpoint was trained with, recorded in its manifest and checked by `--load`.

A checkpoint holds token ids' embeddings and an optimizer state for one tokenizer, one model config, one block
length and one data format. Resumed with another tokenizer (a BPE retrained on other data shares about half of
its entries), the model goes on training on ids that mean other things, without a word; with another config
of the same shapes (a rope theta), it is another model. `--load` compares each with the manifest and names what
differs and the flag that fixes it. Without `--tokenizer` or `--model`, a resumed run uses the tokenizer saved in
the checkpoint (`<tag>/tokenizer`), never a newly trained one.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from models.lora import AdapterPlan
from models.quantize import Quantization
from models.safetensors_files import weights_fingerprint
from train.distributed.setup import say
from train.errors import ConfigError

TOKENIZER_DIR = "tokenizer"  # inside a checkpoint tag: the run's tokenizer, saved with it
# Config entries that do not change the model a checkpoint holds.
# What a from-scratch model's config takes from the tokenizer (train/prepare.py: model_config_for).
FROM_TOKENIZER = {"vocab_size", "bos_token_id", "eos_token_id"}
VOLATILE_CONFIG_KEYS = {
    *("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "use_cache"),
    *("id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict"),
}


def checkpoint_tokenizer_dir(tag_dir: Path) -> Path | None:
    """The tokenizer a checkpoint was trained with: saved in the tag, or (older checkpoints) in its run folder."""
    for folder in (tag_dir / TOKENIZER_DIR, tag_dir.parent.parent / "tokenizer"):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary: every token and its id, added and special tokens included."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def trained_with(
    *, tokenizer: PreTrainedTokenizerBase, seq_len: int, data_format: str, attention: str, data_order: dict
) -> dict:
    """The manifest entries `--load` checks (the model config is recorded beside them); `data_order`: see
    `data_order_of`."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "data_format": data_format,
        "attention": attention,
        "data_order": data_order,
    }


def data_order_of(*, seed: int, order: str, stream_sources: list | None) -> dict:
    """What decides which block a resumed run trains next: the seed of the shuffle, the order, and for a stream the
    files it reads (each with its size and modification time: `Source.fingerprint`), in order."""
    return {"seed": seed, "order": order, "stream_sources": stream_sources}


def check_data_order(manifest: dict, ours: dict, *, load: Path, weights_only: bool) -> None:
    """An exact resume goes on with the blocks the checkpoint's run would have trained next."""
    saved = manifest.get("data_order")
    if weights_only or saved is None or saved == json.loads(json.dumps(ours)):
        return
    fix = "or --reset-optimizer to go on from its weights with a new data order"
    if saved["seed"] != ours["seed"] and saved["order"] == ours["order"] == "shuffled":
        raise ConfigError(f"--load {load}: the checkpoint shuffled its data with --seed {saved['seed']}, not "
                          f"{ours['seed']}: pass --seed {saved['seed']} ({fix})")  # fmt: skip
    if saved["order"] != ours["order"]:
        raise ConfigError(f"--load {load}: the checkpoint read its data {saved['order']}, not {ours['order']}: pass "
                          f"--data-order {saved['order']} ({fix})")  # fmt: skip
    if saved["stream_sources"] != ours["stream_sources"] and saved["stream_sources"] and ours["stream_sources"]:
        raise ConfigError(
            f"--load {load}: the checkpoint streamed other data (its files, their sizes or modification times "
            "differ, and its stream position would point elsewhere): pass the --data it streamed, unchanged "
            f"({fix})"
        )


def check_layout_of_data(
    manifest: dict, *, load: Path, seq_len: int, data_format: str, attention: str, weights_only: bool
) -> None:
    """The block length, data format and attention of the run match the checkpoint's (a weights-only resume may
    change them). A checkpoint from before an entry was recorded is not checked for it."""
    if weights_only:
        return
    if manifest.get("attention", attention) != attention:
        raise ConfigError(
            f"--load {load}: the checkpoint was trained with --attention {manifest['attention']}, not {attention} "
            f"(which changes what every token sees): pass --attention {manifest['attention']} (or --reset-optimizer "
            f"to go on from its weights with --attention {attention})"
        )
    if manifest.get("seq_len", seq_len) != seq_len:
        raise ConfigError(
            f"--load {load}: the checkpoint was trained with --seq-len {manifest['seq_len']}, not {seq_len}: pass "
            f"--seq-len {manifest['seq_len']} (or --reset-optimizer to train its weights on {seq_len}-token blocks)"
        )
    if manifest.get("data_format", data_format) != data_format:
        raise ConfigError(
            f"--load {load}: the checkpoint was trained on --data-format {manifest['data_format']}, not "
            f"{data_format}: pass --data-format {manifest['data_format']} (or --reset-optimizer to fine-tune its "
            "weights on other data)"
        )


def config_differences(saved: dict, ours: dict, ignore: set[str] = frozenset()) -> list[str]:
    saved, ours = (json.loads(json.dumps(c, sort_keys=True, default=str)) for c in (saved, ours))  # as saved: JSON
    skip = VOLATILE_CONFIG_KEYS | set(ignore)
    keys = sorted((set(saved) | set(ours)) - skip)
    return [f"{key} {saved.get(key)!r} vs {ours.get(key)!r}" for key in keys if saved.get(key) != ours.get(key)]


def check_model_config(manifest: dict, ours: dict, *, load: Path, ignore: set[str] = frozenset()) -> None:
    """The model config matches the checkpoint's, but for entries that do not change the model (and `ignore`)."""
    differences = config_differences(manifest["model_config"], ours, ignore)
    if differences:
        raise ConfigError(
            f"--load {load}: the model config differs from the checkpoint's ({'; '.join(differences[:3])}): pass the "
            "--model-config (or --model) it was trained with"
        )


def check_tokenizer(manifest: dict, tokenizer: PreTrainedTokenizerBase, *, load: Path, flag: str) -> None:
    expected = manifest.get("tokenizer_fingerprint")
    if expected is not None and tokenizer_fingerprint(tokenizer) != expected:
        raise ConfigError(
            f"--load {load}: {flag} {tokenizer.name_or_path} is not the tokenizer the checkpoint was trained with "
            f"(vocabulary hash {tokenizer_fingerprint(tokenizer)}, the checkpoint's {expected}): drop {flag} to use "
            "the checkpoint's own, or pass the one it was trained with"
        )


def manifest_extras(
    *, base_model: str | None, model_dir: Path | None, adapters: AdapterPlan | None, quantization: Quantization | None
) -> dict:
    """What a checkpoint's manifest records besides the model config: the `--model`'s generation config (its stop
    tokens and sampling defaults, for the export), and for LoRA the adapters and the base model they fit (its
    name and a fingerprint of its weights), which `--load` and `train.export` need again."""
    if model_dir is None:
        return {}
    generation = model_dir / "generation_config.json"
    extras = {"generation_config": json.loads(generation.read_text())} if generation.is_file() else {}
    if adapters is None:
        return extras
    return extras | {
        "adapters": adapters.to_dict(),
        "quantization": dataclasses.asdict(quantization) if quantization is not None else None,
        "base_model": base_model,
        "base_model_dir": str(model_dir.resolve()),
        "base_model_fingerprint": weights_fingerprint(model_dir),
    }


def stream_position(client_state: dict, *, load: Path | None, streaming: bool, sources: list[str]) -> dict | None:
    """Where a resumed `--streaming` run's stream continues: the checkpoint's position, when it streamed the same
    `sources` (else the stream starts again from its beginning, said in one line)."""
    if not streaming or not load:
        return None
    saved = client_state.get("stream_position")
    if saved is None:
        say(
            f"--load {load} holds no stream position (it was not a --streaming run): the stream starts "
            "from the beginning of the data"
        )
        return None
    if saved["sources"] != sources:
        say(
            f"--load {load} streamed other --data ({', '.join(saved['sources'])}): the stream starts "
            "from the beginning of this --data"
        )
        return None
    return saved["state"]
