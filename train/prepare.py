"""Tokenizer and packed data for a run, and `python -m train.prepare ARGS` to build them ahead of a job.

The same flags as training (`--data`, `--tokenizer`, `--seq-len`, ...); run it on a login
node so that the ranks of a large job start by memory-mapping the cache.
"""

import sys
from pathlib import Path

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from models.hub import resolve_model_dir
from models.portable import make_portable, max_positions
from train.checkpoint.manifest import verified_tag_dir
from train.checkpoint.same_run import checkpoint_tokenizer_dir
from train.config.args import Flags, parse_args
from train.config.run_config import RunConfig, resolve_run_config
from train.data.examples import DataFormat
from train.data.packing import packed_dataset
from train.data.streaming import record_batches
from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from train.distributed.faults import inject_fault
from train.errors import ConfigError, entry_point

BPE_TRAINING_DOCUMENTS = 2_000_000  # BPE merges settle long before a large corpus is read to the end


def prepare_tokenizer(config: RunConfig, build: bool) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved in `<output_dir>/tokenizer` with the run's chat template (`--chat-template`) and
    the model's context as its `model_max_length`, readable by transformers 4.x too (models/portable.py); the
    exports copy it. `build=False` reads what the builder saved."""
    args, tokenizer_dir = config.flags, config.output_dir / "tokenizer"
    if not build:
        return load_tokenizer(str(tokenizer_dir))  # saved by the builder
    if args.load and not args.tokenizer and not args.model:  # a resume: the checkpoint's own, never a new one
        saved = checkpoint_tokenizer_dir(verified_tag_dir(args.load))
        if saved is not None:
            return save_tokenizer(load_tokenizer(str(saved), flag="--load"), tokenizer_dir, config)
    if args.tokenizer or args.model:
        tokenizer = (
            load_tokenizer(args.tokenizer)
            if args.tokenizer
            else load_tokenizer(str(resolve_model_dir(args.model)), flag="--model")
        )
        if config.data_format.chat_template is not None:  # trained with it: it travels with the model
            tokenizer.chat_template = config.data_format.chat_template
        return save_tokenizer(tokenizer, tokenizer_dir, config)
    print(f"training a byte-level BPE tokenizer (vocab {config.bpe_vocab_size}) on the training text", flush=True)

    def documents():  # read as a stream: nothing is cached for it
        seen, text = 0, DataFormat(text_column=args.text_column)
        for source in config.sources:
            for _, batch in record_batches(source, text):
                yield [str(t) for t in batch["text"] if t is not None]
                seen += len(batch["text"])
                if seen >= BPE_TRAINING_DOCUMENTS:
                    return

    return save_tokenizer(train_bpe_tokenizer(documents(), config.bpe_vocab_size, tokenizer_dir), tokenizer_dir, config)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, config: RunConfig) -> PreTrainedTokenizerBase:
    tokenizer.save_pretrained(folder)  # the run folder is self-contained
    make_portable(folder, context=max_positions(config.model_config.to_dict()))
    return tokenizer


def prepare_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
    inject_fault("prepare-data")
    args = config.flags
    return packed_dataset(
        config.sources,
        config.data_format,
        tokenizer,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        cache_dir=config.data_cache_dir,
        num_proc=config.num_proc,
        val_sources=config.val_sources,
        seed=args.seed,
    )


def prepare(flags: Flags) -> None:
    config = resolve_run_config(flags, world_size=flags.pipeline_stages)
    if config.streaming:
        raise ConfigError("train.prepare builds the packed cache, which --streaming does without: drop --streaming")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    splits = prepare_data(config, prepare_tokenizer(config, build=True))
    print(f"ready: {len(splits['train']):,} training and {len(splits['validation']):,} validation blocks")


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv)
    return entry_point(lambda: prepare(flags), flags.output_dir.resolve() / "error.log")


if __name__ == "__main__":
    sys.exit(main())
