"""Per-step metrics: metrics.jsonl, Weights & Biases and one progress line, all from one rank."""

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.router_loss import CrossEntropyWithRouterLoss
from train.distributed.setup import say
from train.observe.expert_load import EXPERT_LOAD_FILE, ExpertLoad
from train.observe.memory import peak_memory_per_stage
from train.observe.mfu import tflops_and_mfu


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


def rewind(path: Path, step: int) -> None:
    """A resumed run rewinds its step files to its checkpoint: the steps after it are trained again."""
    if path.exists():
        kept = [line for line in readable_lines(path) if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class StepMeter:
    """A step's metrics from its loss and time (whether the run diverged is train/observe/divergence.py's)."""

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
        expert_load: ExpertLoad | None = None,
        perplexity: bool = True,
    ):
        self.engine, self.global_batch = engine, global_batch
        self.perplexity = perplexity  # `ppl` beside the loss (not for preference data: DataFormat.perplexity)
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.tokens_per_step = global_batch * seq_len
        self.memory_before_model = memory_before_model
        self.compile_report_due = compiled
        self.expert_load = expert_load  # a mixture of experts' (None for a dense model)

    def report_compile(self, seconds: float) -> None:
        """With --compile, once: the first step's time, which holds the compilation of this run's layers."""
        if self.compile_report_due:
            say(f"compile: the first step took {seconds:.1f} s (torch.compile of every layer, forward and backward)")
            self.compile_report_due = False

    def begin_step(self) -> None:
        """Forget the router loss and expert load of steps not logged: `aux_loss` and `expert_load_*` are the logged
        step's own."""
        loss_fn = self.engine.module.loss_fn
        if isinstance(loss_fn, CrossEntropyWithRouterLoss):
            loss_fn.take_aux()
        if self.expert_load is not None:
            self.expert_load.begin_step()

    def aux_loss(self) -> float | None:
        """The step's router loss (before its coefficient), averaged over its micro-batches and replicas, or None
        without one. A collective: the stage that computes the loss holds the terms (rank 0's under DualPipeV)."""
        loss_fn = self.engine.module.loss_fn
        if not isinstance(loss_fn, CrossEntropyWithRouterLoss):
            return None
        device = get_accelerator().current_device_name()  # NCCL reduces device tensors only
        total = torch.tensor(loss_fn.take_aux(), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def grad_norm(self) -> float:
        """The last step's global gradient norm."""
        return float(self.engine.get_global_grad_norm() or 0.0)

    def metrics(
        self,
        loss: float,
        grad_norm: float,
        *,
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
            **({"ppl": perplexity(loss)} if self.perplexity else {}),
            "lr": self.engine.get_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "samples_per_sec": self.global_batch / seconds,
            "step_time": seconds,
            "data_wait": data_wait,
            **tflops_and_mfu(self.flops_per_token, tokens_per_sec, dist.get_world_size(), self.peak_tflops),
            **peak_memory_per_stage(self.engine, self.memory_before_model),
        }
        aux = self.aux_loss()
        if aux is not None:
            metrics["aux_loss"] = aux
        if self.expert_load is not None:
            metrics.update(self.expert_load.step_metrics())
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


def eval_metrics(eval_loss: float, with_perplexity: bool = True) -> dict:
    """`eval_loss`, and `eval_ppl` beside it where the loss is a token cross-entropy (`DataFormat.perplexity`)."""
    return {"eval_loss": eval_loss} | ({"eval_ppl": perplexity(eval_loss)} if with_perplexity else {})


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
        for name in ("metrics.jsonl", EXPERT_LOAD_FILE):
            rewind(output_dir / name, resume_step)
        self.file = open(output_dir / "metrics.jsonl", "a")  # closed in finish()
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
        for prefix, what in (("", "rewards"), ("eval_", "val rewards")):  # preference data (docs/preference.md)
            if f"{prefix}rewards/accuracies" in metrics:
                accuracy, margin = metrics[f"{prefix}rewards/accuracies"], metrics[f"{prefix}rewards/margins"]
                line += f" | {what}: accuracy {accuracy:.2f} margin {margin:.4f}"
        if "eval_loss" in metrics:
            line += f" | val loss {metrics['eval_loss']:.4f}"
            if "eval_ppl" in metrics:  # not for preference data
                line += f" ppl {metrics['eval_ppl']:.2f}"
        wait, step_time = metrics.get("data_wait") or 0.0, metrics.get("step_time") or 0.0
        # The first step also opens the data (a stream reads its first records): not a bottleneck.
        if step > self.resume_step + 1 and step_time and wait > DATA_BOUND_SHARE * step_time:
            line += f" | data wait {wait:.2f} s, {wait / step_time:.0%} of the step: the data path is the bottleneck"
        print(line, flush=True)

    def finish(self, failed: bool = False) -> None:
        """Close metrics.jsonl and end the W&B run (`failed`: marked as failed), on every exit of the loop."""
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else None)
