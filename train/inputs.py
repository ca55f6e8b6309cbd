"""A run's inputs: the tokenizer, the model config, the data (the packed cache, or a stream under `--streaming`)
and the feed of training micro-batches each data-reading rank hands the engine."""

import copy
from dataclasses import dataclass

from datasets import Dataset
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from models.architecture import Architecture, discover
from train.checkpoint.manifest import read_manifest, verified_tag_dir
from train.checkpoint.same_run import check_model_config, check_tokenizer
from train.config.run_config import RunConfig
from train.data.batches import MicroBatchFeed, StreamMicroBatches, TrainMicroBatches
from train.data.packing import default_eval_blocks, evaluation_blocks
from train.data.shared_cache import tokenize_once_per_job
from train.data.streaming import StreamingData, streaming_data
from train.data.tokenizer import tokenizer_too_large
from train.distributed.agreement import every_rank, rank_zero_first
from train.distributed.setup import rank, say
from train.errors import ConfigError
from train.prepare import prepare_data, prepare_tokenizer


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
    requested = config.flags.eval_blocks
    if used == validation or (requested is not None and used == requested):
        return f"{used:,} used per evaluation"
    wanted = min(requested or default_eval_blocks(config.flags.seq_len), validation)
    why = f"every evaluation step takes a whole global batch of {config.batch.global_batch}"
    if requested is None and wanted < validation:
        why = f"the default holds {wanted * config.flags.seq_len:,} tokens (--eval-blocks); " + why
    return f"{used:,} of {validation:,} used per evaluation: {why}"


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
    wanted = flags.eval_blocks or default_eval_blocks(flags.seq_len)
    return streaming_data(
        config.sources,
        config.val_sources,
        config.data_format,
        tokenizer,
        seq_len=flags.seq_len,
        eval_blocks=max(global_batch, wanted - wanted % global_batch),
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
