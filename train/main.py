"""Training entry point: `deepspeed --module train.main ARGS` (see launch.sh).

Phases: check inputs -> tokenizer -> packed data -> pipeline model -> DeepSpeed engine
-> train/evaluate loop -> checkpoint -> Hugging Face export -> sample.
"""

import json
import logging
import math
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger

from models.architecture import discover
from models.flops import flops_per_token
from models.hf_weights import export_hf_model, load_hf_weights, resolve_model_dir
from models.pipeline import build_pipeline
from train.args import parse_args
from train.batches import TrainMicroBatches
from train.checkpoint import latest_tag, load_checkpoint, save_checkpoint
from train.distributed import init_distributed, raise_if_any_failed, rank, rank_zero_first
from train.ds_config import zero_stage
from train.errors import ConfigError, RunError
from train.evaluate import evaluate, sample_through_pipeline
from train.generate import generate_text
from train.metrics import (
    MetricsLog,
    eval_metrics,
    memory_in_use,
    peak_memory_per_stage,
    perplexity,
    run_environment,
    wandb_mode,
)
from train.mfu import peak_tflops, tflops_and_mfu, training_dtype
from train.preflight import check_inputs
from train.prepare import prepare_data, prepare_tokenizer
from train.timeline import ScheduleProfiler, summary_line
from train.tokenizer import tokenizer_too_large


class DropMessage(logging.Filter):
    """Drops one known-harmless library message, leaving every other warning visible."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# deepspeed.initialize reads the LR before the scheduler's first step and warns about it.
ds_logger.addFilter(DropMessage("Attempting to get learning rate from scheduler before it has started"))


def say(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


def parameter_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay (its amount set in the DeepSpeed JSON) on matrices only, not on biases and LayerNorms."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # A stage may hold no vectors at all (only the tied head): an empty group hangs ZeRO's set-up.
    return [g for g in groups if g["params"]]


def stages_summary(engine) -> list[dict]:
    """Layers and parameters of every stage: `parameters` counts the tied embedding on the first stage
    only (they add up to the model), `held_parameters` is what the stage keeps in memory."""
    pipe = engine.module
    tied = {id(p) for m in pipe.tied_modules.values() for p in m.parameters()}
    params = sum(p.numel() for p in pipe.parameters() if engine.is_first_stage() or id(p) not in tied)
    layers = [spec.typename.__name__ for spec in pipe._layer_specs[pipe._local_start : pipe._local_stop]]
    everyone = [None] * dist.get_world_size()
    held = sum(p.numel() for p in pipe.parameters())
    dist.all_gather_object(everyone, (engine.grid.data_parallel_id, engine.stage_id, layers, params, held))
    return [{"stage": stage, "layers": layers, "parameters": n, "held_parameters": h}
            for dp, stage, layers, n, h in sorted(everyone, key=lambda x: x[1]) if dp == 0]  # fmt: skip


def run(args) -> None:
    init_distributed()
    world_size = dist.get_world_size()
    output_dir: Path = args.output_dir.resolve()

    # Phase 1: inputs. Every rank checks; all fail together with the same one-line error.
    error = None
    try:
        ds_config, model_config, args.sources, (global_batch, micro, micro_batches) = check_inputs(args, world_size)
    except ConfigError as e:
        error = str(e)
    raise_if_any_failed(error)
    if rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # Phase 2: tokenizer and packed data, built by rank 0 and then read from disk by the others.
    tokenizer = rank_zero_first(lambda: prepare_tokenizer(args, output_dir, build=rank() == 0))
    if args.model is None:
        model_config.vocab_size = len(tokenizer)
        model_config.bos_token_id = model_config.eos_token_id = tokenizer.eos_token_id
    elif len(tokenizer) > model_config.vocab_size:
        raise ConfigError(tokenizer_too_large(len(tokenizer), model_config.vocab_size))
    arch = discover(model_config)
    splits = rank_zero_first(lambda: prepare_data(args, tokenizer))
    if len(tokenizer) < model_config.vocab_size:
        say(f"embedding has {model_config.vocab_size} rows for {len(tokenizer)} tokens (padded vocabulary)")
    eval_blocks = min(args.eval_blocks or len(splits["validation"]), len(splits["validation"]))
    eval_blocks -= eval_blocks % global_batch  # every evaluation step consumes one global batch
    if len(splits["train"]) < global_batch:
        raise ConfigError(
            f"{len(splits['train'])} training blocks of {args.seq_len} tokens do not fill one global batch of "
            f"{global_batch} sequences: use more data, a shorter --seq-len or a smaller train_batch_size"
        )
    if eval_blocks == 0:
        raise ConfigError(
            f"{len(splits['validation'])} validation blocks of {args.seq_len} tokens do not fill one global batch of "
            f"{global_batch} sequences: use a larger --val-fraction, --val-data, or a smaller train_batch_size"
        )
    say(
        f"data: {len(splits['train']):,} training and {len(splits['validation']):,} validation blocks of "
        f"{args.seq_len} tokens ({eval_blocks} used per evaluation)"
    )

    # Phase 3: the pipeline model and DeepSpeed engine.
    memory_before_model = memory_in_use()
    try:
        pipe = build_pipeline(
            arch,
            args.pipeline_stages,
            args.partition_method,
            args.seed,
            args.activation_checkpoint_interval,
            args.seq_len,
        )
    except ValueError as e:  # a partition DeepSpeed cannot run
        raise ConfigError(str(e)) from None
    if args.model:
        error, n = None, 0
        try:  # a missing or misshapen tensor: every rank stops with the first rank's line
            n = load_hf_weights(pipe, resolve_model_dir(args.model), arch)
        except (OSError, ValueError) as e:
            error = f"cannot load --model {args.model}: {str(e).splitlines()[0]}"
        raise_if_any_failed(error)
        # One write, so that the ranks' reports do not interleave on the shared stdout.
        sys.stdout.write(
            f"rank {rank()}: loaded {n} pretrained tensors for layers {pipe._local_start}-{pipe._local_stop - 1}\n"
        )
    engine, _, _, _ = deepspeed.initialize(model=pipe, model_parameters=parameter_groups(pipe), config=ds_config)
    dp_rank, dp_size = engine.grid.data_parallel_id, engine.grid.data_parallel_size
    run_config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "sources"},
        "deepspeed": ds_config,
        "topology": {
            "world_size": world_size,
            "pipeline_stages": args.pipeline_stages,
            "data_parallel": dp_size,
            "stage_layer_bounds": [int(b) for b in pipe.parts],
            "micro_batches_per_step": micro_batches,
            "stages": stages_summary(engine),
        },
        "model": model_config.to_dict(),
        "flops_per_token": flops_per_token(arch, args.seq_len),
        **run_environment(),
    }
    run_config["parameters"] = sum(s["parameters"] for s in run_config["topology"]["stages"])
    if rank() == 0:
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    say(
        f"model: {model_config.model_type}, {run_config['parameters']:,} parameters, "
        f"{args.pipeline_stages} stages x {dp_size} data-parallel, "
        f"layer bounds {run_config['topology']['stage_layer_bounds']}, {micro_batches} micro-batches of {micro}"
    )
    if dp_size == 1 and zero_stage(ds_config) >= 1:
        say("note: ZeRO with 1 data-parallel replica shards nothing: zero_optimization.stage 0 skips its copies")
    # Phase 4: resume, if asked. Weights, optimizer, LR schedule, RNG and data position come back.
    start_step, wandb_run_id = 0, None
    if args.load:
        error, client_state = None, {}
        try:
            client_state = load_checkpoint(engine, args.load, args.reset_optimizer)
        except ConfigError as e:
            error = str(e)
        raise_if_any_failed(error)
        start_step, wandb_run_id = client_state["step"], client_state.get("wandb_run_id")
        say(f"resumed from {args.load} at step {start_step}")
        if start_step >= args.train_steps:
            raise ConfigError(f"the checkpoint is at step {start_step}; raise --train-steps above it to train further")
    log = MetricsLog(output_dir, rank() == 0, args.train_steps, run_config, args.wandb_project,
                     args.wandb_run_name, wandb_mode(args.wandb_mode), start_step, wandb_run_id)  # fmt: skip

    # Phase 5: the loop. Only the first and last stage read data; both compute the same batches.
    feeds_data = engine.is_first_stage() or engine.is_last_stage()
    batches = TrainMicroBatches(splits["train"], micro, micro_batches, dp_rank, dp_size, args.seed, start_step)
    if args.trace_batches and feeds_data:
        (output_dir / "batches").mkdir(exist_ok=True)
        stage = engine.stage_id
        batches.trace = open(output_dir / "batches" / f"stage{stage}_dp{dp_rank}.jsonl", "a")  # noqa: SIM115
    data_iter = iter(batches) if feeds_data else None
    checkpoints = output_dir / "checkpoints"
    tokens_per_step = global_batch * args.seq_len
    peak = peak_tflops(training_dtype(ds_config), args.peak_tflops)
    profiler = ScheduleProfiler(engine, set(args.profile_steps)) if args.profile_steps else None
    for step in range(start_step + 1, args.train_steps + 1):
        if profiler:
            profiler.begin(step)
        start = time.perf_counter()
        loss = engine.train_batch(data_iter=data_iter).item()
        elapsed = time.perf_counter() - start
        data_wait, batches.wait_seconds = batches.wait_seconds, 0.0
        bubble = profiler.end(output_dir) if profiler else None
        if bubble:
            say(f"step {step} timeline in {output_dir / 'timeline'}: {summary_line(bubble)}")
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        # Without fp16 loss scaling a non-finite gradient is no overflow to skip: the run has diverged.
        if not math.isfinite(loss) or (not engine.fp16_enabled() and not math.isfinite(grad_norm)):
            raise RunError(
                f"loss {loss:g}, gradient norm {grad_norm:g} at step {step}: stopped without saving; the last "
                f"checkpoint is {latest_tag(checkpoints) or 'none'} (lower the LR or check the data)"
            )
        last = step == args.train_steps
        if step % args.log_interval == 0 or step % args.eval_interval == 0 or last:
            metrics = {"loss": loss, "ppl": perplexity(loss), "lr": engine.get_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_sec": tokens_per_step / elapsed, "samples_per_sec": global_batch / elapsed,
                       "step_time": elapsed, "data_wait": data_wait,
                       **tflops_and_mfu(run_config["flops_per_token"], tokens_per_step / elapsed, world_size, peak),
                       **peak_memory_per_stage(engine, memory_before_model)}  # fmt: skip
            if bubble:
                metrics.update({f"bubble/stage{s}": b for s, b in bubble["measured"].items()})
            if step % args.eval_interval == 0 or last:
                metrics.update(eval_metrics(evaluate(engine, splits["validation"], micro, micro_batches, eval_blocks)))
                samples = sample_through_pipeline(engine, tokenizer, args.sample_prompt, args.sample_tokens,
                                                  args.seq_len, micro, seed=args.seed + step)  # fmt: skip
                log.samples(step, samples[:3])
            if last:
                metrics["tied_embedding_max_diff"] = engine.module.tied_weight_max_diff()
            log.log(step, metrics)
            log.progress(step, metrics)
        if last or (args.save_interval and step % args.save_interval == 0):
            client_state = {"consumed_samples": step * global_batch, "wandb_run_id": log.run_id, "data_seed": args.seed}
            tag_dir = save_checkpoint(engine, checkpoints, step, client_state, model_config, args.keep_last)
    log.finish()

    # Phase 6: Hugging Face export of the final checkpoint, and a sample of what the model learned.
    hf_dir = output_dir / "hf"
    if rank() == 0:
        export_hf_model(tag_dir, model_config, hf_dir, tokenizer)
        say(f"Hugging Face export: {hf_dir}")
        say("sample: " + generate_text(hf_dir, args.sample_prompt, args.sample_tokens, seed=args.seed))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RunError as e:
        if not dist.is_initialized() or rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            # Every rank stops here together (the error was agreed on by a collective). Left to interpreter exit,
            # gloo's threads sometimes abort the process ("terminate called without an active exception"), and
            # the launcher then reports exit code 250 instead of 2.
            dist.destroy_process_group()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
