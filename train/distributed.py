"""Process group set-up and the few collectives the trainer needs around DeepSpeed."""

import os
import re
from collections.abc import Callable
from typing import TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from train.errors import ConfigError

T = TypeVar("T")
SHARED_MEMORY_ALL_REDUCE_OP = "deepspeed_shm_comm"


def init_distributed() -> None:
    """Backend and device from DeepSpeed's accelerator (NCCL on CUDA, gloo or oneCCL on CPU)."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU fallback: ranks share the machine's cores; oversubscribing them only thrashes.
            local_ranks = int(os.environ.get("LOCAL_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        # DeepSpeed JIT-compiles its shared-memory all-reduce at init on CPU, although only inference uses it.
        # torch guards that build with a lock file in ~/.cache/torch_extensions which a rank killed at the
        # wrong moment leaves behind, and every later launch then waits on it forever, printing nothing.
        deepspeed.ops.__compatible_ops__[SHARED_MEMORY_ALL_REDUCE_OP] = False
    else:
        _drop_arch_suffixes_deepspeed_cannot_parse()
        # Before the process group: NCCL binds each rank's communicator to the current device.
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())


def _drop_arch_suffixes_deepspeed_cannot_parse() -> None:
    """DeepSpeed 0.19.8's JIT builder (FusedAdam) sorts TORCH_CUDA_ARCH_LIST numerically and crashes on
    Hopper/Blackwell feature suffixes ("9.0a", "10.0f"), which CUDA images commonly set; its kernels need none."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", archs)
    if plain != archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"note: TORCH_CUDA_ARCH_LIST {archs!r} -> {plain!r} for DeepSpeed's JIT-built ops", flush=True)


def rank() -> int:
    return dist.get_rank()


def raise_if_any_failed(error: str | None) -> None:
    """Every rank raises the first rank's ConfigError, so that no rank waits on a dead peer."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run `fn` on global rank 0 (it fills caches, trains the tokenizer, downloads), then on the first rank
    of every other node (which finds the work done on a shared filesystem, or does it once for its node),
    then on all the others, which read what is on disk. An error on any rank stops every rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    result = None
    for turn in (rank() == 0, rank() != 0 and local_rank == 0, local_rank != 0):
        error = None
        if turn:
            try:
                result = fn()
            except (ConfigError, FileNotFoundError, ValueError) as e:
                error = str(e)
        raise_if_any_failed(error)
    return result
