"""Per-step metrics: metrics.jsonl, Weights & Biases and one progress line, all from one rank."""

import json
import math
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.deepspeed_internals import partition_bounds, tied_parameters
from models.quantize import parameter_count
from train.config.ds_config import BatchLayout
from train.distributed.setup import say
from train.errors import RunError
from train.observe.mfu import tflops_and_mfu


def memory_in_use() -> int:
    """Bytes in use now: allocated device memory on an accelerator, resident set size on CPU."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return accelerator.memory_allocated()
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_before_model() -> int:
    """`memory_in_use()` once the modules that building the engine and the first forward import are imported: on
    CPU the resident set counts imported code too, which is no part of the model (60-80 MB in tests/test_plan.py).
    They are transformers 5.24's masking utilities (imported by models/masking.py at the first forward; they
    import torch._dynamo) and the module DeepSpeed 0.19.8's ZeRO optimizer check imports in `deepspeed.initialize`
    (`zero/utils.py: is_zero_supported_optimizer`: its Muon optimizer, whose `@torch.compile` imports
    torch._inductor). A run imports both anyway."""
    import transformers.masking_utils  # noqa: F401

    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # as DeepSpeed itself: the module needs an optional package
        pass
    return memory_in_use()


def peak_memory_per_stage(engine, before_model: int) -> dict[str, float]:
    """Per stage, the largest over its replicas (MB): `peak_mem_mb`, the peak (device memory on an
    accelerator, resident set size on CPU), and `model_mem_mb`, that peak less what was in use before the
    model was built: weights, gradients, optimizer states and activations, what `train.plan` estimates.
    A collective."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = accelerator.max_memory_allocated()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (engine.stage_id, peak, peak - before_model))
    per_stage: dict[str, float] = {}
    for stage, value, growth in everyone:
        for key, v in ((f"peak_mem_mb/stage{stage}", value), (f"model_mem_mb/stage{stage}", growth)):
            per_stage[key] = max(per_stage.get(key, 0.0), v / 2**20)
    return per_stage


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
    `trainable_parameters` what trains (LoRA: the adapters), counted as `parameters`. A collective."""
    pipe = engine.module
    tied = {id(p) for p in tied_parameters(pipe)}
    params = sum(parameter_count(p) for p in pipe.parameters() if engine.is_first_stage() or id(p) not in tied)
    held = sum(parameter_count(p) for p in pipe.parameters())
    trainable = sum(
        p.numel() for p in pipe.parameters() if p.requires_grad and (engine.is_first_stage() or id(p) not in tied)
    )
    everyone = [None] * dist.get_world_size()
    bounds = [list(b) for b in pipe.stage_layers()]
    mine = (engine.grid.data_parallel_id, engine.stage_id, bounds, pipe.stage_layer_names(), params, held, trainable)
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


def readable_lines(path: Path) -> list[str]:
    """The whole JSON lines of a metrics file: a run killed while writing leaves its last line cut off."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            lines.append(line)
    return lines


class StepMeter:
    """A step's metrics from its loss and time; stops the run when the loss or the gradient diverges."""

    def __init__(
        self,
        *,
        engine: PipelineEngine,
        global_batch: int,
        seq_len: int,
        flops_per_token: float,
        peak_tflops: float | None,
        memory_before_model: int,
        compiled: bool = False,
    ):
        self.engine, self.global_batch = engine, global_batch
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.tokens_per_step = global_batch * seq_len
        self.memory_before_model = memory_before_model
        self.compile_report_due = compiled

    def report_compile(self, seconds: float) -> None:
        """With --compile, once: the first step's time, which holds the compilation of this run's layers."""
        if self.compile_report_due:
            say(f"compile: the first step took {seconds:.1f} s (torch.compile of every layer, forward and backward)")
            self.compile_report_due = False

    def grad_norm(self) -> float:
        """The last step's global gradient norm."""
        return float(self.engine.get_global_grad_norm() or 0.0)

    def stop_if_diverged(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> None:
        """Raise (no checkpoint is saved) when the loss, or the gradient without fp16 loss scaling, is not finite:
        without loss scaling a non-finite gradient is no overflow to skip, the run has diverged."""
        if not math.isfinite(loss) or (not self.engine.fp16_enabled() and not math.isfinite(grad_norm)):
            raise RunError(
                f"loss {loss:g}, gradient norm {grad_norm:g} at step {step}: stopped without saving; the last "
                f"checkpoint is {last_checkpoint or 'none'} (lower the LR or check the data)"
            )

    def metrics(
        self,
        loss: float,
        grad_norm: float,
        seconds: float,
        data_wait: float,
        answer_tokens: int | None,
        timeline: dict | None,
        last_step: bool,
    ) -> dict:
        """The logged metrics of a step (a collective: memory per stage, and the tied weights at the end).
        `answer_tokens`: the tokens in the loss, for instruction and chat data (None for text)."""
        tokens_per_sec = self.tokens_per_step / seconds
        metrics = {
            "loss": loss,
            "ppl": perplexity(loss),
            "lr": self.engine.get_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "samples_per_sec": self.global_batch / seconds,
            "step_time": seconds,
            "data_wait": data_wait,
            **tflops_and_mfu(self.flops_per_token, tokens_per_sec, dist.get_world_size(), self.peak_tflops),
            **peak_memory_per_stage(self.engine, self.memory_before_model),
        }
        if answer_tokens is not None:
            metrics["answer_tokens"] = answer_tokens
            metrics["masked_fraction"] = 1 - answer_tokens / self.tokens_per_step
        if timeline:
            metrics.update({f"bubble/stage{s}": b for s, b in timeline["measured"].items()})
        if last_step:
            metrics["tied_embedding_max_diff"] = self.engine.module.tied_weight_max_diff()
        return metrics


@dataclass(frozen=True, kw_only=True)
class WandbSettings:
    """The --wandb-* flags."""

    project: str
    run_name: str | None = None
    mode: str | None = None


def wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def eval_metrics(eval_loss: float) -> dict:
    return {"eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)}


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


DATA_BOUND_SHARE = 0.1  # a step that waits longer than this share of it for its batch says so in its line


class MetricsLog:
    """Writes what one rank (global rank 0) measured; every other rank holds a silent one."""

    def __init__(
        self,
        *,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        interval: int,
        wandb: WandbSettings,
        run_config: dict,
        resume_step: int = 0,
        wandb_run_id: str | None = None,
    ):
        self.enabled = enabled
        self.output_dir = output_dir
        self.resume_step = resume_step
        self.sample_rows: list[list] = []
        self.total_steps, self.interval = total_steps, interval
        self.start = time.perf_counter()
        self.wandb = None
        self.run_id = None
        if not enabled:
            return
        path = output_dir / "metrics.jsonl"
        if path.exists():  # a resumed run rewinds to its checkpoint: steps after it are trained again
            kept = [line for line in readable_lines(path) if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 (closed in finish)
        mode = wandb_mode(wandb.mode)
        if mode != "disabled":
            import wandb as wandb_sdk

            self.wandb = wandb_sdk.init(
                project=wandb.project,
                name=wandb.run_name or output_dir.name,
                mode=mode,
                dir=str(output_dir),
                config=run_config,
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )
            self.run_id = self.wandb.id

    def should_log(self, step: int, last_step: bool) -> bool:
        return last_step or step % self.interval == 0

    def log(self, step: int, metrics: dict) -> None:
        """metrics.jsonl, W&B and the progress line."""
        self.progress(step, metrics)
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def samples(self, step: int, texts: list[str]) -> None:
        """Generated text at an evaluation: samples.jsonl and a W&B table that grows over the run."""
        if not self.enabled:
            return
        with open(self.output_dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, "sample": t}) + "\n" for t in texts)
        if self.wandb is not None:
            import wandb

            self.sample_rows += [[step, t] for t in texts]
            self.wandb.log({"samples": wandb.Table(columns=["step", "sample"], data=self.sample_rows)}, step=step)

    def progress(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (step - self.resume_step) * (self.total_steps - step)
        line = (
            f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {metrics['loss']:.4f} | "
            f"lr {metrics['lr']:.2e} | grad norm {metrics['grad_norm']:.3f} | "
            f"{metrics['tokens_per_sec']:,.0f} tok/s | eta {format_duration(eta)}"
        )
        if "eval_loss" in metrics:
            line += f" | val loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}"
        wait, step_time = metrics.get("data_wait") or 0.0, metrics.get("step_time") or 0.0
        # The first step also opens the data (a stream reads its first records): not a bottleneck.
        if step > self.resume_step + 1 and step_time and wait > DATA_BOUND_SHARE * step_time:
            line += f" | data wait {wait:.2f} s, {wait / step_time:.0%} of the step: the data path is the bottleneck"
        print(line, flush=True)

    def finish(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
