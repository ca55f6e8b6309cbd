"""The run record (`run_config.json` and W&B's config): the flags, the DeepSpeed JSON, the topology with every
stage's layers and parameters, the model, library versions and the git revision."""

import json
import subprocess
from pathlib import Path

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig

from models.deepspeed_internals import partition_bounds, tied_parameters
from models.quantize import parameter_count
from train.config.ds_config import BatchLayout
from train.config.run_config import RunConfig
from train.distributed.setup import rank, say
from train.observe.console import model_line


def run_environment() -> dict:
    """Library versions and the git revision, for the run's config."""
    import datasets
    import deepspeed
    import torch
    import transformers

    try:
        revision = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "git_revision": revision,
        "device": get_accelerator().device_name(),
    }


def stages_summary(engine: PipelineEngine) -> list[dict]:
    """Layers and parameters of every pipeline rank (`stage`: one stage under 1F1B, two under DualPipeV, whose
    [start, stop) `layer_bounds` lists): `parameters` counts the tied embedding on the first stage
    only (they add up to the model), `held_parameters` is what the stage keeps in memory,
    `trainable_parameters` what trains (LoRA: the adapters), counted as `parameters`. With tensor parallelism
    `parameters` and `trainable_parameters` count a cut parameter whole, `held_parameters` this rank's part.
    A collective."""
    pipe, slices = engine.module, engine.grid.get_slice_parallel_world_size()
    tied = {id(p) for p in tied_parameters(pipe)}
    counted = [p for p in pipe.parameters() if engine.is_first_stage() or id(p) not in tied]
    whole = [slices if getattr(p, "model_parallel", False) else 1 for p in counted]
    params = sum(parameter_count(p) * n for p, n in zip(counted, whole, strict=True))
    held = sum(parameter_count(p) for p in pipe.parameters())
    trainable = sum(p.numel() * n for p, n in zip(counted, whole, strict=True) if p.requires_grad)
    everyone = [None] * dist.get_world_size()
    bounds = [list(b) for b in pipe.stage_layers()]
    dp = engine.grid.data_parallel_id + engine.grid.get_slice_parallel_rank()  # 0: the first replica's first slice
    mine = (dp, engine.stage_id, bounds, pipe.stage_layer_names(), params, held, trainable)
    dist.all_gather_object(everyone, mine)
    return [
        {
            "stage": stage,
            "layer_bounds": bounds,
            "layers": layers,
            "parameters": n,
            "held_parameters": h,
            "trainable_parameters": t,
        }
        for dp, stage, bounds, layers, n, h, t in sorted(everyone, key=lambda x: x[1])
        if dp == 0
    ]


def run_record(
    flags: dict, ds_config: dict, engine: PipelineEngine, batch: BatchLayout, model_config: dict, flops_per_token: float
) -> dict:
    """What `run_config.json` and W&B's config hold: the flags, the DeepSpeed JSON, the layout, the model."""
    stages = stages_summary(engine)
    topology = {
        "world_size": dist.get_world_size(),
        "pipeline_stages": engine.num_stages,  # pipeline ranks per replica
        "data_parallel": engine.grid.data_parallel_size,
        "tensor_parallel": engine.grid.get_slice_parallel_world_size(),
        "schedule": engine.module.SCHEDULE,
        "stage_layer_bounds": partition_bounds(engine.module),  # of 2 x ranks stages under dualpipev
        "micro_batches_per_step": batch.num_micro_batches,
        "stages": stages,
    }
    return {
        "args": flags,
        "deepspeed": ds_config,
        "topology": topology,
        "model": model_config,
        "flops_per_token": flops_per_token,
        **run_environment(),
        "parameters": sum(s["parameters"] for s in stages),
        "trainable_parameters": sum(s["trainable_parameters"] for s in stages),
    }


def write_run_record(config: RunConfig, engine: PipelineEngine, model_config: PretrainedConfig, flops: float) -> dict:
    """`run_config.json` (also W&B's config) and the model line; a collective."""
    batch = config.batch
    record = run_record(
        flags=config.flags.as_dict(),
        ds_config=config.ds_config,
        engine=engine,
        batch=batch,
        model_config=model_config.to_dict(),
        flops_per_token=flops,
    )
    record["attention"] = "document" if config.document_attention else "causal"  # --attention, resolved
    if rank() == 0:
        (config.output_dir / "run_config.json").write_text(json.dumps(record, indent=2, default=str))
    say(model_line(record, model_type=model_config.model_type, lora=config.adapters is not None, batch=batch))
    return record
