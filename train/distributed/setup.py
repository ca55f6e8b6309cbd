"""Process group set-up and the few collectives the trainer needs around DeepSpeed."""

import os
import re
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from models.deepspeed_internals import set_default_group_timeout, skip_shared_memory_all_reduce_build

# Every process group times out this long after --dist-timeout: the hang watchdog (watchdog.py beside this file)
# reports first inside the training loop; outside it (set-up, checkpoint saves) the process group's own timeout ends
# the wait, as an error line naming error.log.
WATCHDOG_HEAD_START_S = 30
# Ranks waiting for rank 0 to tokenize a large corpus wait on a group of their own, so that --dist-timeout
# need not cover data preparation (which `python -m train.prepare` can also do ahead of the job).
PREPARATION_TIMEOUT = timedelta(hours=24)
_preparation_group: dist.ProcessGroup | None = None


def init_distributed(timeout_s: float = 1800) -> None:
    """Backend and device from DeepSpeed's accelerator (NCCL on CUDA, gloo or oneCCL on CPU); every process
    group, DeepSpeed's own included, times out `timeout_s` + 30 s into a wait."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU fallback: ranks share the machine's cores; oversubscribing them only thrashes.
            local_ranks = int(os.environ.get("LOCAL_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        skip_shared_memory_all_reduce_build()
    else:
        _drop_arch_suffixes_deepspeed_cannot_parse()
        # Before the process group: NCCL binds each rank's communicator to the current device.
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s + WATCHDOG_HEAD_START_S)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), timeout=timeout)
    global _preparation_group
    _preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)


def preparation_group() -> dist.ProcessGroup | None:
    """The group on which ranks wait while rank 0 prepares the tokenizer and data (a day's timeout)."""
    return _preparation_group


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


def say(message: str) -> None:
    """Print on global rank 0 only (or in the one process of the preflight)."""
    if not dist.is_initialized() or rank() == 0:
        print(message, flush=True)
