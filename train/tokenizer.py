"""The run's tokenizer: an existing Hugging Face one, or a byte-level BPE trained on the training text."""

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(name_or_dir: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_dir} has no EOS token: documents could not be separated when packing")
    return tokenizer


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
