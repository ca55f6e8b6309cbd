"""The run's tokenizer: an existing Hugging Face one, or a byte-level BPE trained on the training text."""

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.hub import check_hub_name, not_found
from train.errors import ConfigError, first_line

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(name_or_dir: str, flag: str = "--tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer folder or hub name (`flag` names where it came from in errors)."""
    try:
        if not Path(name_or_dir).exists():
            check_hub_name(flag, str(name_or_dir))
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:  # transformers and the hub raise many types; a mistyped folder is a "repo id" error
        if isinstance(e, ValueError) and str(e).startswith(flag):
            raise ConfigError(str(e)) from None
        if not Path(name_or_dir).exists():
            raise ConfigError(not_found(flag, str(name_or_dir), e)) from None
        reason = first_line(e)
        raise ConfigError(
            f"{flag} {name_or_dir}: cannot load a tokenizer from it ({reason}); pass --tokenizer"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_dir} has no EOS token: documents could not be separated when packing")
    return tokenizer


def tokenizer_too_large(tokens: int, vocab_size: int) -> str:
    return (
        f"the tokenizer has {tokens} tokens but the model's embedding only {vocab_size} rows: pass the model's "
        "own tokenizer (or none: --model's is used)"
    )


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerBase:
    """Train GPT-2-style byte-level BPE (EOS = <|endoftext|>) and save it with `save_pretrained`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
