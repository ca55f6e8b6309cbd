"""Everything a run needs, built in one place and in this order: tokenizer and packed data, the pipeline
model and its DeepSpeed engine, the resumed state, and the components the loop drives (metrics log and
meter, evaluator, checkpointer, schedule profiler)."""

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from models.architecture import Architecture, ranges_text
from models.flops import flops_per_token
from models.hf_weights import load_hf_weights
from models.lora import AdapterPlan, add_adapters
from models.pipeline import CausalLMPipeline, build_pipeline
from models.quantize import expert_weights, kept_weights, parameter_count, quantize_stage
from models.tensor_parallel_stage import pipeline_topology, slice_stage
from train.checkpoint.checkpointer import Checkpointer, load_checkpoint
from train.checkpoint.same_run import manifest_extras, stream_position, trained_with
from train.config.run_config import RunConfig
from train.data.batches import MicroBatchFeed, StreamMicroBatches
from train.distributed.agreement import every_rank
from train.distributed.faults import inject_fault
from train.distributed.preemption import Preemption
from train.distributed.setup import rank, say
from train.distributed.watchdog import HangWatchdog
from train.errors import ConfigError, first_line
from train.observe.console import lora_line
from train.observe.evaluate import Evaluator, SampleLog, Sampling, evaluation_sample_tokens
from train.observe.expert_load import ExpertLoad, expert_load_of
from train.observe.memory import memory_before_model
from train.observe.metrics import MetricsLog, StepMeter, WandbSettings
from train.observe.mfu import peak_tflops, training_dtype
from train.observe.run_record import write_run_record
from train.observe.timeline import ScheduleProfiler
from train.preference.run import PreferenceRun, preference_loss_of
from train.prepare import Inputs, prepare_inputs, training_batches


@dataclass(kw_only=True)
class Run:
    config: RunConfig
    model_config: PretrainedConfig  # a from-scratch model's vocabulary is the tokenizer's
    tokenizer: PreTrainedTokenizerBase
    engine: PipelineEngine
    start_step: int
    batches: MicroBatchFeed
    data_iter: Iterator | None  # only the first and the last stage read data; both compute the same batches
    log: MetricsLog
    meter: StepMeter
    evaluator: Evaluator
    checkpointer: Checkpointer
    profiler: ScheduleProfiler
    watchdog: HangWatchdog
    preemption: Preemption
    preference: PreferenceRun  # preference data: its reference and TRL's metrics


def parameter_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay (its amount set in the DeepSpeed JSON) on weight matrices only: not on norms, biases or attention
    sinks, including the 2-D per-expert biases of a mixture of experts (gpt-oss's `gate_up_proj_bias` [E, 2I]),
    which a rule on dimensions alone would decay. The names: transformers' `*bias` (as its Trainer's
    `get_decay_parameter_names` excludes them)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    decayed = [p.dim() >= 2 and not name.rpartition(".")[2].endswith("bias") for name, p in named]
    groups = [
        {"params": [p for (_, p), decay in zip(named, decayed, strict=True) if decay]},
        {"params": [p for (_, p), decay in zip(named, decayed, strict=True) if not decay], "weight_decay": 0.0},
    ]
    # A stage may hold no vectors at all (only the tied head): an empty group hangs ZeRO's set-up.
    return [g for g in groups if g["params"]]


def build_engine(config: RunConfig, arch: Architecture) -> PipelineEngine:
    """The pipeline model (pretrained weights loaded per stage) inside DeepSpeed's pipeline engine."""
    flags = config.flags
    try:
        pipe = build_pipeline(
            arch,
            flags.pipeline_stages,
            partition_method=flags.partition_method,
            seed=flags.seed,
            activation_checkpoint_interval=flags.activation_checkpoint_interval,
            seq_len=flags.seq_len,
            schedule=flags.schedule,
            loss_fn=preference_loss_of(config),
            topology=pipeline_topology(flags.pipeline_stages, flags.tensor_parallel, config.world_size),
        )
    except ValueError as e:  # a partition DeepSpeed cannot run
        raise ConfigError(str(e)) from None
    layers = ranges_text(pipe.stage_layers())
    if flags.model:
        loaded = every_rank(lambda: load_pretrained(pipe, arch, config))
        # One write, so that the ranks' reports do not interleave on the shared stdout.
        sys.stdout.write(f"rank {rank()}: loaded {loaded} pretrained tensors for layers {layers}\n")
    if cut := slice_stage(pipe, arch):  # the full weights first, on every slice rank; the optimizer after
        sys.stdout.write(f"rank {rank()}: {cut} decoder layers cut {flags.tensor_parallel} ways (tensor parallel)\n")
    if config.quantization is not None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[training_dtype(config.ds_config)]
        quantized = every_rank(lambda: quantize_stage(pipe, config.quantization, dtype))
        sys.stdout.write(
            f"rank {rank()}: {quantized} linear layers in 4 bits ({config.quantization.quant_type}); "
            f"{kept_weights(pipe):,} weights stay in {training_dtype(config.ds_config)}, "
            f"{expert_weights(pipe):,} of them the experts' fused weights\n"
        )
    if config.adapters is not None:
        adapted = every_rank(lambda: adapt(pipe, config.adapters, flags.seed))
        trainable = sum(p.numel() for p in pipe.parameters() if p.requires_grad)
        held = sum(parameter_count(p) for p in pipe.parameters())
        sys.stdout.write(lora_line(rank(), adapted=adapted, layers=layers, trainable=trainable, held=held))
    engine, _, _, _ = deepspeed.initialize(model=pipe, model_parameters=parameter_groups(pipe), config=config.ds_config)
    if flags.compile:  # one torch.compile per layer (PipelineModule.compile), done lazily in the first step
        engine.compile(backend=flags.compile_backend)
    return engine


def adapt(pipe: CausalLMPipeline, adapters: AdapterPlan, seed: int) -> int:
    try:
        return add_adapters(pipe, adapters, seed)
    except (OSError, ValueError) as e:  # an initial adapter file that does not fit
        raise ConfigError(first_line(e)) from None


def load_pretrained(pipe: CausalLMPipeline, arch: Architecture, config: RunConfig) -> int:
    try:
        inject_fault("empty-error:model", raises=OSError)
        return load_hf_weights(pipe, config.model_dir, arch)
    except (OSError, ValueError) as e:  # a missing or misshapen tensor
        raise ConfigError(f"cannot load --model {config.flags.model}: {first_line(e)}") from None


def resume(config: RunConfig, engine: PipelineEngine) -> dict:
    """The client state of `--load` (its step, W&B run id, stream position), once weights, optimizer, LR schedule and
    RNG are restored from it; {"step": 0} without it."""
    flags = config.flags
    if not flags.load:
        return {"step": 0}
    adapters_only = config.adapters is not None
    client_state = every_rank(lambda: load_checkpoint(engine, flags.load, config.resume_mode, adapters_only))
    how = {"exact": "", "universal": " (another layout: through a universal checkpoint)", "weights": " (weights only)"}[
        config.resume_mode
    ]
    say(f"resumed from {flags.load} at step {client_state['step']}{how}")
    if client_state["step"] >= flags.train_steps:
        raise ConfigError(
            f"the checkpoint is at step {client_state['step']}; raise --train-steps above it to train further"
        )
    return client_state


def evaluator(
    config: RunConfig,
    engine: PipelineEngine,
    inputs: Inputs,
    *,
    log: SampleLog,
    parameters: int,
    expert_load: ExpertLoad | None = None,
) -> Evaluator:
    flags = config.flags
    return Evaluator(
        engine=engine,
        blocks=inputs.validation,
        n_blocks=inputs.eval_blocks,
        key_offset=len(inputs.train) if inputs.train is not None else 0,  # preference: the reference's keys
        batch=config.batch,
        document_attention=config.document_attention,
        interval=flags.eval_interval,
        sampling=Sampling(
            tokenizer=inputs.tokenizer,
            prompt=None if config.data_format.masked else flags.sample_prompt,
            tokens=evaluation_sample_tokens(flags.sample_tokens, parameters),
            seq_len=flags.seq_len,
            seed=flags.seed,
        ),
        log=log,
        expert_load=expert_load,
        perplexity=config.data_format.perplexity,
    )


def checkpointer(
    config: RunConfig, engine: PipelineEngine, inputs: Inputs, *, log: MetricsLog, batches
) -> Checkpointer:
    flags, tokenizer = config.flags, inputs.tokenizer
    position = None
    if isinstance(batches, StreamMicroBatches):
        sources = [s.spec for s in config.sources]
        position = lambda step: {"state": batches.position(step), "sources": sources}  # noqa: E731
    extras = manifest_extras(
        base_model=flags.model, model_dir=config.model_dir, adapters=config.adapters, quantization=config.quantization
    )
    return Checkpointer(
        engine=engine,
        root=config.output_dir / "checkpoints",
        model_config=inputs.model_config,
        interval=flags.save_interval,
        keep_last=flags.keep_last,
        samples_per_step=config.batch.global_batch,
        client_state={"wandb_run_id": log.run_id, "data_seed": flags.seed},
        stream_position=position,
        adapters_only=config.adapters is not None,
        tokenizer=inputs.tokenizer,
        manifest=extras
        | trained_with(
            tokenizer=tokenizer,
            seq_len=flags.seq_len,
            data_format=config.data_format.kind,
            attention="document" if config.document_attention else "causal",
            data_order=config.data_order,
        ),
    )


def build_run(config: RunConfig, preemption: Preemption) -> Run:
    flags = config.flags
    if rank() == 0:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(flags.seed)
    inputs = prepare_inputs(config)
    model_config, arch = inputs.model_config, inputs.arch
    memory_before = memory_before_model()
    engine = build_engine(config, arch)
    flops = flops_per_token(arch, flags.seq_len)
    record = write_run_record(config, engine, model_config, flops)
    client_state = resume(config, engine)
    start_step = client_state["step"]
    log = MetricsLog(
        output_dir=config.output_dir,
        enabled=rank() == 0,
        total_steps=flags.train_steps,
        interval=flags.log_interval,
        wandb=WandbSettings(project=flags.wandb_project, run_name=flags.wandb_run_name, mode=flags.wandb_mode),
        run_config=record,
        resume_step=start_step,
        wandb_run_id=client_state.get("wandb_run_id"),
    )
    try:
        return assemble(config, engine, inputs, log=log, client_state=client_state, record=record, flops=flops,
                        memory_before=memory_before, preemption=preemption)  # fmt: skip
    except BaseException:
        log.finish(failed=True)  # opened above: closed on this way out too (train() closes it on the others)
        raise


def assemble(
    config: RunConfig,
    engine: PipelineEngine,
    inputs: Inputs,
    *,
    log: MetricsLog,
    client_state: dict,
    record: dict,
    flops: float,
    memory_before: int,
    preemption: Preemption,
) -> Run:
    """The run's components around its engine and metrics log."""
    flags, start_step = config.flags, client_state["step"]
    sources = [s.spec for s in config.sources]
    position = stream_position(client_state, load=flags.load, streaming=config.streaming, sources=sources)
    batches = training_batches(config, engine, inputs, start_step=start_step, stream_position=position)
    feeds_data = engine.is_first_stage() or engine.is_last_stage()
    expert_load = expert_load_of(engine, output_dir=config.output_dir, writes=rank() == 0, start_step=start_step)
    (preference := PreferenceRun(config, engine)).start(inputs.train, inputs.validation, inputs.eval_blocks, start_step)
    return Run(
        config=config,
        model_config=inputs.model_config,
        tokenizer=inputs.tokenizer,
        engine=engine,
        start_step=start_step,
        batches=batches,
        data_iter=iter(batches) if feeds_data else None,
        log=log,
        meter=StepMeter(
            engine=engine,
            global_batch=config.batch.global_batch,
            seq_len=flags.seq_len,
            flops_per_token=flops,
            peak_tflops=peak_tflops(training_dtype(config.ds_config), flags.peak_tflops),
            memory_before_model=memory_before,
            compiled=flags.compile,
            expert_load=expert_load,
            perplexity=config.data_format.perplexity,
        ),
        evaluator=evaluator(config, engine, inputs, log=log, parameters=record["parameters"], expert_load=expert_load),
        checkpointer=checkpointer(config, engine, inputs, log=log, batches=batches),
        profiler=ScheduleProfiler(engine=engine, steps=set(flags.profile_steps), output_dir=config.output_dir),
        watchdog=HangWatchdog(engine=engine, timeout_s=flags.dist_timeout, report_dir=config.output_dir / "hang"),
        preemption=preemption,
        preference=preference,
    )
