"""Tokenizer and packed data for a run, and `python -m train.prepare ARGS` to build them ahead of a job.

The same flags as training (`--data`, `--tokenizer`, `--seq-len`, ...); run it on a login
node so that the ranks of a large job start by memory-mapping the cache.
"""

import os
import sys
from argparse import Namespace
from pathlib import Path

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from models.hf_weights import resolve_model_dir
from train.args import parse_args
from train.data import default_cache_dir, load_texts, packed_dataset, resolve_sources
from train.errors import ConfigError
from train.preflight import check_inputs
from train.tokenizer import load_tokenizer, train_bpe_tokenizer

BPE_TRAINING_DOCUMENTS = 2_000_000  # BPE merges settle long before a large corpus is read to the end


def prepare_tokenizer(args: Namespace, output_dir: Path, build: bool) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved in `<output_dir>/tokenizer`. `build=False` reads what the builder saved."""
    tokenizer_dir = output_dir / "tokenizer"
    if not build or (args.load and not args.tokenizer and (tokenizer_dir / "tokenizer.json").exists()):
        return load_tokenizer(str(tokenizer_dir))  # saved by the builder, or kept by a resumed run
    if args.tokenizer or args.model:
        tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer
                     else load_tokenizer(str(resolve_model_dir(args.model)), flag="--model"))
        tokenizer.save_pretrained(tokenizer_dir)  # the run folder is self-contained
        return tokenizer
    print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on the training text", flush=True)

    def documents():
        seen = 0
        for source in args.sources:
            for batch in load_texts(source, args.text_column).iter(batch_size=1000):
                yield batch["text"]
                seen += len(batch["text"])
                if seen >= BPE_TRAINING_DOCUMENTS:
                    return

    return train_bpe_tokenizer(documents(), args.vocab_size, tokenizer_dir)


def prepare_data(args: Namespace, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
    val_sources = resolve_sources(args.val_data) if args.val_data else None
    return packed_dataset(args.sources, args.text_column, tokenizer, args.seq_len, args.val_fraction,
                          args.data_cache_dir or default_cache_dir(), args.num_proc or os.cpu_count(),
                          val_sources, args.seed)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _, _, args.sources, _ = check_inputs(args, world_size=args.pipeline_stages)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        splits = prepare_data(args, prepare_tokenizer(args, args.output_dir.resolve(), build=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready: {len(splits['train']):,} training and {len(splits['validation']):,} validation blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
