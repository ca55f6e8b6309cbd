"""Per-step metrics: metrics.jsonl, Weights & Biases and one progress line, all from one rank."""

import json
import math
import os
import resource
import subprocess
import time
from pathlib import Path

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def memory_in_use() -> int:
    """Bytes in use now: allocated device memory on an accelerator, resident set size on CPU."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return accelerator.memory_allocated()
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "datasets": datasets.__version__},
            "git_revision": revision, "device": get_accelerator().device_name()}  # fmt: skip


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


class MetricsLog:
    """Writes what one rank (global rank 0) measured; every other rank holds a silent one."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        run_config: dict,
        wandb_project: str,
        wandb_run_name: str | None,
        wandb_mode_: str,
        resume_step: int = 0,
        wandb_run_id: str | None = None,
    ):
        self.enabled = enabled
        self.output_dir = output_dir
        self.resume_step = resume_step
        self.sample_rows: list[list] = []
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.wandb = None
        self.run_id = None
        if not enabled:
            return
        path = output_dir / "metrics.jsonl"
        if path.exists():  # a resumed run rewinds to its checkpoint: steps after it are trained again
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 (closed in finish)
        if wandb_mode_ != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_project,
                name=wandb_run_name or output_dir.name,
                mode=wandb_mode_,
                dir=str(output_dir),
                config=run_config,
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )
            self.run_id = self.wandb.id

    def log(self, step: int, metrics: dict) -> None:
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
        print(line, flush=True)

    def finish(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
