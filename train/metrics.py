"""Per-step metrics: metrics.jsonl, Weights & Biases and one progress line, all from one rank."""

import json
import math
import os
import time
from pathlib import Path


def wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def eval_metrics(eval_loss: float) -> dict:
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}


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
        self.resume_step = resume_step
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
            self.wandb.log(metrics, step=step)

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
