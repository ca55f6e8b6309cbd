"""Memory probes: what a rank holds now, before its model is built, and at its peak, per pipeline stage."""

import resource
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


def memory_before_model() -> int:
    """`memory_in_use()` once the modules that building the engine and the first forward import are imported: on
    CPU the resident set counts imported code too, which is no part of the model (60-80 MB in
    tests/unit/test_plan.py). They are transformers 5.24's masking utilities (imported by models/masking.py at the
    first forward; they import torch._dynamo) and the module DeepSpeed 0.19.8's ZeRO optimizer check imports in
    `deepspeed.initialize` (`zero/utils.py: is_zero_supported_optimizer`: its Muon optimizer, whose `@torch.compile`
    imports torch._inductor). A run imports both anyway."""
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
