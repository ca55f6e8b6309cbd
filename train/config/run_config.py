"""The run's configuration, checked and resolved once: flags + DeepSpeed JSON + model config + data sources.

Every rank resolves the same `RunConfig` from the same flags (launch.sh's preflight does it once before them). Any
bad value is a `ConfigError` naming the flag and the fix. Nothing downstream re-reads a flag's raw value."""

import importlib.util
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import PretrainedConfig

from models.architecture import discover
from models.hub import resolve_model_dir
from models.lora import AdapterPlan
from models.presets import resolve_model_config
from models.quantize import Quantization
from models.safetensors_files import weights_fingerprint
from train.checkpoint.manifest import layout_of, read_manifest, resume_mode, verified_tag_dir
from train.checkpoint.same_run import (
    FROM_TOKENIZER,
    check_data_order,
    check_layout_of_data,
    check_model_config,
    data_order_of,
)
from train.config.adapters import (
    adapters_from_flags,
    check_checkpoint_adapters,
    check_every_stage_trains,
    quantization_from_flags,
)
from train.config.args import DEFAULT_BPE_VOCAB, Flags, check_flag_ranges
from train.config.ds_config import BatchLayout, check_layout, load_ds_config
from train.config.flag_effects import check_flag_effects
from train.config.tensor_parallel import check_tensor_parallel_resume, check_tensor_parallel_run
from train.data.examples import DataFormat
from train.data.packing import default_cache_dir
from train.data.sources import Source, embedded_corpus, resolve_sources, without_validation
from train.distributed.faults import inject_fault
from train.distributed.setup import say
from train.errors import ConfigError, first_line
from train.planning.memory_model import stage_bounds
from train.planning.schedules import rank_layer_ranges, stages_per_rank


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    flags: Flags  # the parsed flags, as given (read-only)
    world_size: int
    output_dir: Path  # absolute
    ds_config: dict  # the DeepSpeed JSON with "auto" resolved
    model_config: PretrainedConfig  # as resolved from the flags; a from-scratch vocabulary is the tokenizer's later
    sources: list[Source]
    val_sources: list[Source] | None  # None: --val-fraction of every source is held out
    data_format: DataFormat
    document_attention: bool  # --attention document: per-document masks and positions in packed blocks
    streaming: bool  # --streaming: no cache, blocks packed on the fly (train/data/streaming.py)
    shuffle: bool  # --data-order: shuffled (the default) or sequential (implied by --streaming)
    data_order: dict  # what decides the next block of a resumed run (checkpoint/same_run.py: data_order_of)
    data_cache_dir: Path  # --data-cache-dir, or PIPEGPT_CACHE, or ~/.cache/pipegpt
    num_proc: int  # tokenization processes: --num-proc, or every core
    batch: BatchLayout
    bpe_vocab_size: int  # of a tokenizer trained on the data
    adapters: AdapterPlan | None  # LoRA (train/config/adapters.py); None: every weight trains
    quantization: Quantization | None  # QLoRA's 4-bit base (--load-in-4bit)
    resume_mode: str | None  # with --load: "exact", "universal" or "weights" (checkpoint/manifest.py: resume_mode)

    @cached_property
    def model_dir(self) -> Path | None:
        """`--model`'s save_pretrained folder, resolved once for the run: a local folder as given, a hub name
        downloaded (config and safetensors). Resolved where first read (its tokenizer or its weights), not with the
        rest: the preflight resolves the same config and downloads no weights. ValueError naming what is wrong."""
        return resolve_model_dir(self.flags.model) if self.flags.model else None


def read_chat_template(path: Path) -> str:
    """A `--chat-template` file's text: a Jinja template, not a JSON file (a tokenizer_config.json holds its
    template as a JSON string; rendered as Jinja, the whole file's text would wrap every conversation)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--chat-template {path}: cannot read it ({first_line(e)}); pass a Jinja template file"
        ) from None
    try:
        is_json = isinstance(json.loads(text), dict | list)
    except ValueError:
        is_json = False
    if is_json:
        raise ConfigError(
            f'--chat-template {path} is a JSON file, not a Jinja template: save its "chat_template" value as a '
            ".jinja file and pass that, or drop --chat-template to use the tokenizer's own"
        )
    return text


def data_format_from_flags(flags: Flags) -> DataFormat:
    if flags.data_format != "text" and not (flags.model or flags.tokenizer):
        raise ConfigError(
            f"--data-format {flags.data_format} needs a pretrained tokenizer (--model or --tokenizer): a BPE trained "
            "here knows no chat or prompt format"
        )
    template = None
    if flags.chat_template is not None:
        if not flags.chat_template.is_file():
            raise ConfigError(f"--chat-template {flags.chat_template}: no such file; pass a Jinja template file")
        template = read_chat_template(flags.chat_template)
    return DataFormat(
        flags.data_format,
        flags.text_column,
        prompt_column=flags.prompt_column,
        completion_column=flags.completion_column,
        messages_column=flags.messages_column,
        chosen_column=flags.chosen_column,
        rejected_column=flags.rejected_column,
        chat_template=template,
        packing=flags.packing,
        overlong=flags.overlong,
    )


def data_order(flags: Flags) -> str:
    if flags.streaming and flags.data_order == "shuffled":
        raise ConfigError(
            "--streaming reads its blocks in order: drop --data-order shuffled, or shuffle the data beforehand"
        )
    return flags.data_order or ("sequential" if flags.streaming else "shuffled")


def check_compile(flags: Flags) -> None:
    """A backend torch.compile knows, with what it needs here: inductor compiles C++ on CPU, Triton on GPUs."""
    if not flags.compile:
        return
    import shutil

    import torch
    from deepspeed.accelerator import get_accelerator

    backends = torch._dynamo.list_backends(exclude_tags=())
    if flags.compile_backend not in backends:
        raise ConfigError(
            f"--compile-backend {flags.compile_backend!r} is not a torch.compile backend: use one of {backends}"
        )
    if flags.compile_backend != "inductor":
        return
    if get_accelerator().device_name() == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if not shutil.which(compiler):
            raise ConfigError(
                f"--compile with inductor on CPU needs a C++ compiler ({compiler} not found): install g++ or set CXX, "
                "or pass --compile-backend aot_eager"
            )
    elif importlib.util.find_spec("triton") is None:
        raise ConfigError("--compile with inductor on a GPU needs triton: pip install triton, or drop --compile")


def model_config_from_flags(flags: Flags, vocab_size: int | None) -> PretrainedConfig:
    try:
        inject_fault("empty-error:config", raises=ValueError)
        config = resolve_model_config(flags.model_config, flags.model, vocab_size, fused_gelu=not flags.keep_gelu_new)
    except (OSError, ValueError) as e:
        raise ConfigError(first_line(e)) from None
    if flags.router_aux_loss_coef is not None:
        # Kept in the model config (and so in checkpoints and the export), where transformers reads it.
        config.output_router_logits, config.router_aux_loss_coef = True, flags.router_aux_loss_coef
        if discover(config).router_loss is None:
            raise ConfigError(
                f"--router-aux-loss-coef: transformers' {config.model_type} adds no router loss to its loss "
                "(a dense model, or DeepSeek/GLM-4.5, whose routers are steered otherwise); drop the flag"
            )
    return config


def check_seq_len(model_config: PretrainedConfig, seq_len: int) -> None:
    arch = discover(model_config)
    if arch.max_positions() is not None and seq_len > arch.max_positions():
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {arch.max_positions()} positions")


def attention_of(flags: Flags) -> str:
    """`--attention`, or its default: document for prompt-completion and chat data, causal for text."""
    return flags.attention or ("causal" if flags.data_format == "text" else "document")


def check_resume(
    flags: Flags,
    world_size: int,
    model_config: PretrainedConfig,
    adapters: AdapterPlan | None,
    quantization: Quantization | None,
    order: dict,
) -> str:
    """How `--load` resumes (checkpoint/manifest.py: resume_mode), once its checkpoint is known to fit this run:
    the same adapters and base, block length, data format and model config."""
    if not flags.load.exists():
        raise ConfigError(f"--load {flags.load}: no such folder; pass a run's checkpoints folder or a step_N in it")
    replicas = world_size // (flags.pipeline_stages * flags.tensor_parallel)
    resume = resume_mode(flags.load, flags.reset_optimizer, layout_of(flags.pipeline_stages, replicas, flags.schedule,
                                                                      flags.tensor_parallel))  # fmt: skip
    check_tensor_parallel_resume(flags, flags.load, resume)
    local_base = flags.model is not None and Path(flags.model).is_dir()
    fingerprint = weights_fingerprint(Path(flags.model)) if adapters is not None and local_base else None
    manifest = read_manifest(verified_tag_dir(flags.load))
    check_checkpoint_adapters(manifest, adapters, fingerprint, quantization, flags.reset_optimizer)
    check_layout_of_data(
        manifest,
        load=flags.load,
        seq_len=flags.seq_len,
        data_format=flags.data_format,
        attention=attention_of(flags),
        weights_only=flags.reset_optimizer,
    )
    check_data_order(manifest, order, load=flags.load, weights_only=flags.reset_optimizer)
    # The vocabulary and its special ids of a model trained from scratch come from the tokenizer: checked later.
    check_model_config(manifest, model_config.to_dict(), load=flags.load, ignore=FROM_TOKENIZER)
    return resume


def lora_from_flags(flags: Flags, model_config: PretrainedConfig) -> tuple[AdapterPlan | None, Quantization | None]:
    """The adapters (checked to put one on every pipeline stage) and the base's 4-bit quantization, or None."""
    adapters = adapters_from_flags(flags, model_config)
    quantization = quantization_from_flags(flags, adapters)
    if adapters is not None:
        arch = discover(model_config)
        stages = flags.pipeline_stages * stages_per_rank(flags.schedule)
        bounds = stage_bounds(arch, stages, flags.partition_method, flags.seq_len)
        check_every_stage_trains(
            adapters, model_config, rank_layer_ranges(bounds, flags.pipeline_stages, flags.schedule)
        )
    return adapters, quantization


def data_from_flags(flags: Flags) -> tuple[DataFormat, list[Source], list[Source] | None]:
    """The data format, the training sources (less any `--val-data` file they also match) and the validation."""
    data_format = data_format_from_flags(flags)
    sources = resolve_sources(flags.data or [embedded_corpus()])
    val_sources = resolve_sources(flags.val_data) if flags.val_data else None
    if val_sources:
        sources, left_out = without_validation(sources, val_sources)
        if left_out:
            say(f"--val-data: {', '.join(left_out)} left out of the --data it is also in (never trained on)")
    return data_format, sources, val_sources


def resolve_run_config(flags: Flags, world_size: int) -> RunConfig:
    """The checked, resolved configuration, or a ConfigError naming the fix."""
    check_flag_ranges(flags)
    check_flag_effects(flags)
    check_compile(flags)
    ds_config = load_ds_config(flags.deepspeed_config, flags.train_steps)
    bpe_vocab_size = flags.vocab_size or DEFAULT_BPE_VOCAB
    model_config = model_config_from_flags(flags, bpe_vocab_size)
    batch = check_layout(ds_config, world_size, pipeline_stages=flags.pipeline_stages, schedule=flags.schedule,
                         num_layers=model_config.num_hidden_layers, tensor_parallel=flags.tensor_parallel)  # fmt: skip
    check_tensor_parallel_run(flags, model_config)
    if flags.eval_blocks is not None and flags.eval_blocks < batch.global_batch:
        raise ConfigError(
            f"--eval-blocks {flags.eval_blocks} is under one global batch: use at least {batch.global_batch}"
        )
    check_seq_len(model_config, flags.seq_len)
    adapters, quantization = lora_from_flags(flags, model_config)
    data_format, sources, val_sources = data_from_flags(flags)
    order = data_order_of(
        seed=flags.seed,
        order=data_order(flags),
        stream_sources=[s.fingerprint() for s in sources] if flags.streaming else None,
    )
    resume = None
    if flags.load is not None:
        resume = check_resume(
            flags, world_size, model_config=model_config, adapters=adapters, quantization=quantization, order=order
        )
        if resume == "universal":  # DeepSpeed reads this when the engine is built
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return RunConfig(
        flags=flags,
        world_size=world_size,
        output_dir=flags.output_dir.resolve(),
        ds_config=ds_config,
        model_config=model_config,
        sources=sources,
        val_sources=val_sources,
        data_format=data_format,
        document_attention=attention_of(flags) == "document",
        streaming=flags.streaming,
        shuffle=data_order(flags) == "shuffled",
        data_order=order,
        data_cache_dir=flags.data_cache_dir or default_cache_dir(),
        num_proc=flags.num_proc or os.cpu_count() or 1,
        batch=batch,
        bpe_vocab_size=bpe_vocab_size,
        adapters=adapters,
        quantization=quantization,
        resume_mode=resume,
    )
