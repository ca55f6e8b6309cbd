"""Evaluate a model without training: the validation loss (perplexity for text, the answer-only loss for chat and
instruction data) through the pipeline, on any number of ranks, as a training run evaluates it.

    PIPEGPT_MODULE=train.evaluate ./launch.sh --model DIR_OR_HUB_NAME --data ... [--val-data ...]
    PIPEGPT_MODULE=train.evaluate ./launch.sh --load runs/x/checkpoints ARGS_OF_THAT_RUN

The flags are the trainer's. The pipeline, the data (the validation split a run of these flags holds out, or
`--val-data`), the engine and the `Evaluator` are the ones a run builds (train/build.py, train/prepare.py); a
checkpoint's weights are read in any layout (its per-layer files, as `--reset-optimizer` reads them). It writes
`<output-dir>/evaluation.json` (and `tokenizer/`, the tokenizer it evaluated with), no checkpoint, no export, no
metrics log.
"""

import json
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train.build import build_engine, evaluator
from train.checkpoint.checkpointer import load_checkpoint
from train.config.args import Flags, parse_args
from train.config.run_config import RunConfig, resolve_run_config
from train.distributed.agreement import every_rank
from train.distributed.setup import init_distributed, rank, say
from train.errors import RunError, entry_point
from train.main import leave, record_exit_code
from train.observe.run_record import stages_summary
from train.prepare import prepare_inputs

RESULTS_FILE = "evaluation.json"


@dataclass
class CollectedSamples:
    """Where the Evaluator puts its samples (a run's MetricsLog writes them to samples.jsonl): kept for the results."""

    texts: list[str] = field(default_factory=list)

    def samples(self, step: int, texts: list[str]) -> None:
        self.texts += texts


def evaluation_flags(argv: list[str] | None) -> Flags:
    """The trainer's flags; a checkpoint's weights are read alone (`--reset-optimizer`), in any layout, so that
    nothing is converted or written for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = parse_args(argv)
    return parse_args([*argv, "--reset-optimizer"]) if flags.load is not None else flags


def evaluate_model(config: RunConfig) -> dict:
    """Build the run's inputs and engine, load `--load`'s weights, evaluate once; the results (rank 0 writes them
    to `<output-dir>/evaluation.json`). A collective: every rank calls it."""
    flags = config.flags
    if rank() == 0:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(flags.seed)
    inputs = prepare_inputs(config)
    engine = build_engine(config, inputs.arch)
    step = 0
    if flags.load is not None:
        adapters_only = config.adapters is not None
        step = every_rank(lambda: load_checkpoint(engine, flags.load, config.resume_mode, adapters_only))["step"]
        say(f"evaluating {flags.load} (step {step})")
    samples = CollectedSamples()
    parameters = sum(stage["parameters"] for stage in stages_summary(engine))  # the default sampling reads it
    metrics = evaluator(config, engine, inputs, log=samples, parameters=parameters).evaluate(step)
    results = {
        **metrics,
        "blocks": inputs.eval_blocks,
        "tokens": inputs.eval_blocks * flags.seq_len,
        "data_format": config.data_format.kind,
        "model": flags.model or flags.model_config,
        "load": str(flags.load) if flags.load else None,
        "step": step,
        "world_size": config.world_size,
        "pipeline_stages": flags.pipeline_stages,
        "samples": samples.texts,
    }
    if rank() == 0:
        (config.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    ppl = f", perplexity {metrics['eval_ppl']:.4f}" if "eval_ppl" in metrics else ""  # not for preference data
    say(
        f"evaluation: loss {metrics['eval_loss']:.6f}{ppl} over {inputs.eval_blocks:,} blocks of {flags.seq_len} "
        f"tokens; written to {config.output_dir / RESULTS_FILE}"
    )
    return results


def run_evaluation(flags: Flags) -> None:
    init_distributed(flags.dist_timeout)
    try:
        config = every_rank(lambda: resolve_run_config(flags, dist.get_world_size()))
        evaluate_model(config)
    except RunError:
        dist.destroy_process_group()  # every rank stops here together: a RunError is agreed
        raise


def main(argv: list[str] | None = None) -> None:
    flags = evaluation_flags(argv)
    code = entry_point(lambda: run_evaluation(flags), flags.output_dir.resolve() / "error.log")
    record_exit_code(code)
    leave(code)


if __name__ == "__main__":
    main()
