"""Where a plan runs: GPU memory by model, and the ranks launch.sh would start on this machine."""

from train.config.args import Flags

GPU_MEMORY_GIB = {
    "H200": 141,
    "H100": 80,
    "A100": 80,
    "A100-40GB": 40,
    "L40S": 48,
    "A10G": 24,
    "V100": 32,
    "MI300X": 192,
    "MI250X": 128,
}


# launch.sh's ranks on a machine without a GPU (its `NUM_GPUS=${NUM_GPUS:-2}`; tests/unit/test_plan.py reads it there).
LAUNCH_CPU_RANKS = 2


def machine_ranks() -> tuple[int, str]:
    """The ranks launch.sh starts on this machine, and what they are: NUM_GPUS when set, else every GPU, else
    LAUNCH_CPU_RANKS CPU ranks (also with DS_ACCELERATOR=cpu)."""
    import os

    import torch

    gpus = torch.cuda.device_count() if os.environ.get("DS_ACCELERATOR") != "cpu" else 0
    if os.environ.get("NUM_GPUS", "").isdigit() and int(os.environ["NUM_GPUS"]) > 0:
        ranks = int(os.environ["NUM_GPUS"])
        return ranks, f"{ranks} {'GPU' if gpus else 'CPU'} ranks (NUM_GPUS)"
    if gpus:
        return gpus, f"its {gpus} GPUs"
    return LAUNCH_CPU_RANKS, f"{LAUNCH_CPU_RANKS} CPU ranks (no GPU: launch.sh's default; NUM_GPUS sets another)"


def ranks_per_node(flags: Flags) -> int:
    return machine_ranks()[0] if flags.gpus_per_node is None else flags.gpus_per_node
