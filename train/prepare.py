"""A run's inputs: the tokenizer, the model config, the data (the packed cache, or a stream under `--streaming`) and
the feed of training micro-batches each data-reading rank hands the engine; and `python -m train.prepare ARGS`,
which builds the tokenizer and the cache ahead of a job.

The command takes the same flags as training (`--data`, `--tokenizer`, `--seq-len`, ...); run it on a login
node so that the ranks of a large job start by memory-mapping the cache.
"""

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from models.architecture import Architecture, discover
from models.portable import make_portable, max_positions
from train.checkpoint.manifest import read_manifest, verified_tag_dir
from train.checkpoint.same_run import check_model_config, check_tokenizer, checkpoint_tokenizer_dir
from train.config.args import Flags, parse_args
from train.config.run_config import RunConfig, resolve_run_config
from train.data.batches import MicroBatchFeed, StreamMicroBatches, TrainMicroBatches
from train.data.examples import DataFormat
from train.data.shared_cache import tokenize_once_per_job
from train.data.splits import EVAL_TOKENS, evaluation_blocks, packed_dataset, wanted_eval_blocks
from train.data.streaming import StreamingData, record_batches, streaming_data
from train.data.tokenizer import load_tokenizer, tokenizer_too_large, train_bpe_tokenizer
from train.distributed.agreement import every_rank, rank_zero_first
from train.distributed.faults import inject_fault
from train.distributed.setup import rank, say
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
            load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(str(config.model_dir), flag="--model")
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


@dataclass(frozen=True, kw_only=True)
class Inputs:
    tokenizer: PreTrainedTokenizerBase
    model_config: PretrainedConfig  # a from-scratch model's vocabulary is the tokenizer's
    arch: Architecture
    train: Dataset | None  # the packed training blocks; None under --streaming
    stream: StreamingData | None  # --streaming: the validation blocks and the training stream
    validation: Dataset
    eval_blocks: int  # validation blocks per evaluation


def eval_blocks_line(used: int, validation: int, config: RunConfig) -> str:
    """How many validation blocks an evaluation uses, and why not all when it does not."""
    requested, global_batch = config.flags.eval_blocks, config.batch.global_batch
    wanted = min(wanted_eval_blocks(requested, config.flags.seq_len, global_batch), validation)
    line = f"{used:,} used per evaluation"
    if used != wanted:
        line = f"{used:,} of {wanted:,} used per evaluation: every evaluation step takes a whole global batch of "
        line += f"{global_batch}"
    if requested is None and wanted < validation:
        line += f"; by default the blocks of {EVAL_TOKENS:,} tokens (--eval-blocks)"
    return line


def model_config_for(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The resolved model config, with a from-scratch model's vocabulary and special tokens from the tokenizer."""
    model_config = copy.deepcopy(config.model_config)
    if config.flags.model is None:
        model_config.vocab_size = len(tokenizer)
        model_config.bos_token_id = model_config.eos_token_id = tokenizer.eos_token_id
    elif len(tokenizer) > model_config.vocab_size:
        raise ConfigError(tokenizer_too_large(len(tokenizer), model_config.vocab_size))
    return model_config


def stream_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> StreamingData:
    """Every rank opens the stream itself (nothing is written); the validation blocks are read once per rank."""
    flags, global_batch = config.flags, config.batch.global_batch
    wanted = wanted_eval_blocks(flags.eval_blocks, flags.seq_len, global_batch)
    return streaming_data(
        config.sources,
        config.val_sources,
        config.data_format,
        tokenizer,
        seq_len=flags.seq_len,
        eval_blocks=wanted - wanted % global_batch,
        global_batch=global_batch,
        seed=flags.seed,
    )


def prepare_inputs(config: RunConfig) -> Inputs:
    """Tokenizer, model config and architecture, and the data: packed by rank 0 (a shard tokenized per node when
    the nodes share the cache) and read from disk by the others, or opened as a stream on every rank."""
    tokenizer = rank_zero_first(lambda: prepare_tokenizer(config, build=rank() == 0))
    model_config = model_config_for(config, tokenizer)
    if config.flags.load is not None:  # the same run: its tokenizer and model config
        manifest = read_manifest(verified_tag_dir(config.flags.load))
        if config.flags.tokenizer or config.flags.model:
            flag = "--tokenizer" if config.flags.tokenizer else "--model"
            check_tokenizer(manifest, tokenizer, load=config.flags.load, flag=flag)
        check_model_config(manifest, model_config.to_dict(), load=config.flags.load)
    if len(tokenizer) < model_config.vocab_size:
        say(f"embedding has {model_config.vocab_size} rows for {len(tokenizer)} tokens (padded vocabulary)")
    seq_len = config.flags.seq_len
    if config.streaming:
        stream = every_rank(lambda: stream_data(config, tokenizer))
        validation, train = stream.validation, None
        eval_blocks = len(validation) - len(validation) % config.batch.global_batch
        say(
            f"data: streaming {len(config.sources)} source(s) in {seq_len}-token blocks; {len(validation):,} "
            f"validation blocks ({eval_blocks_line(eval_blocks, len(validation), config)})"
        )
    else:
        tokenize_once_per_job(
            config.sources + (config.val_sources or []),
            config.data_format,
            tokenizer,
            cache_dir=config.data_cache_dir,
            seq_len=seq_len,
            num_proc=config.num_proc,
        )
        splits, stream = rank_zero_first(lambda: prepare_data(config, tokenizer)), None
        train, validation = splits["train"], splits["validation"]
        eval_blocks = evaluation_blocks(splits, config.batch.global_batch, seq_len, config.flags.eval_blocks)
        say(
            f"data: {len(train):,} training and {len(validation):,} validation blocks of {seq_len} tokens "
            f"({eval_blocks_line(eval_blocks, len(validation), config)})"
        )
    return Inputs(
        tokenizer=tokenizer,
        model_config=model_config,
        arch=discover(model_config),
        train=train,
        stream=stream,
        validation=validation,
        eval_blocks=eval_blocks,
    )


def training_batches(
    config: RunConfig, engine: PipelineEngine, inputs: Inputs, start_step: int, stream_position: dict | None
) -> MicroBatchFeed:
    """This rank's feed of training micro-batches; only the first and the last stage iterate it."""
    dp_rank = engine.grid.data_parallel_id
    trace = None
    if config.flags.trace_batches and (engine.is_first_stage() or engine.is_last_stage()):
        trace = config.output_dir / "batches" / f"stage{engine.stage_id}_dp{dp_rank}.jsonl"
        trace.parent.mkdir(exist_ok=True)
    feed = dict(
        micro_batch_size=config.batch.micro_batch_size,
        num_micro_batches=config.batch.num_micro_batches,
        dp_rank=dp_rank,
        dp_size=engine.grid.data_parallel_size,
        document_attention=config.document_attention,
        start_step=start_step,
        trace_path=trace,
    )
    if inputs.stream is not None:
        masked = config.data_format.masked
        return StreamMicroBatches(stream=inputs.stream.stream(stream_position), masked=masked, **feed)
    return TrainMicroBatches(blocks=inputs.train, seed=config.flags.seed, shuffle=config.shuffle, **feed)


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
