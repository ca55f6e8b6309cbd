"""PyTorch-native pipelining (torch.distributed.pipelining) on the same GPT-2 halves, for comparison.

    torchrun --nproc_per_node 2 -m bench.torch_pipelining --layers 4 --schedule 1f1b --steps 12

Stage 0: embeddings + the first half of the blocks; stage 1: the rest + ln_f + LM head. The
head is an untied copy of the embedding (PiPPy has no cross-stage weight tying), which costs
the same matmul. Prints one JSON line: the median seconds per step after 2 warm-up steps.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from models.architecture import pipeline_config


class Half(nn.Module):
    def __init__(self, config: GPT2Config, first: bool, blocks: range):
        super().__init__()
        self.first = first
        if first:
            self.wte, self.wpe = (
                nn.Embedding(config.vocab_size, config.n_embd),
                nn.Embedding(config.n_positions, config.n_embd),
            )
        self.h = nn.ModuleList(GPT2Block(pipeline_config(config), layer_idx=i) for i in blocks)
        if not first:
            self.ln_f = nn.LayerNorm(config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[-1]))
        for block in self.h:
            x = block(x)
        return x if self.first else self.lm_head(self.ln_f(x))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def clip_by_global_norm(module: nn.Module, max_norm: float) -> None:
    """Clip by the norm over both stages, as the plain loop and DeepSpeed do (a stage-local norm would
    compute another update, and skip the collective the others pay for)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    squared = torch.stack([g.pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squared)
    scale = (max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = GPT2Config(
        n_layer=a.layers,
        n_embd=256,
        n_head=4,
        n_positions=128,
        vocab_size=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    half = a.layers // 2
    torch.manual_seed(rank)
    module = Half(config, rank == 0, range(half) if rank == 0 else range(half, a.layers))
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    schedule = (Schedule1F1B if a.schedule == "1f1b" else ScheduleGPipe)(stage, a.micro_batches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = torch.randint(
        0, 1024, (a.micro_batches * a.micro_batch_size, 128), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(batch)
        else:
            schedule.step(target=batch, losses=[])
        clip_by_global_norm(module, 1.0)
        optimizer.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"schedule": a.schedule, "layers": a.layers, "step_times": times[2:]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
