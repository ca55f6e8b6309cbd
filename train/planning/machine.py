"""Where a plan runs: GPU memory by model, and the ranks launch.sh would start on this machine."""

from train.config.args import Flags
from train.errors import ConfigError

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

# Intra-node all-reduce bus bandwidth per GPU (GB/s), nccl-tests' `busbw` convention, which a tensor-parallel group
# on one node runs at: the vendor's peak link bandwidth per direction, an assumption, not measured here (NCCL's
# all-reduce reaches about this on NVSwitch systems: ~450-480 GB/s on DGX H100 with NVLink SHARP, less without).
# NVIDIA: NVLink 4 (H100/H200 SXM) 900 GB/s bidirectional, NVLink 3 (A100) 600, NVLink 2 (V100) 300; L40S and A10G
# have no NVLink: PCIe Gen4 x16, 32 GB/s per direction, ~25 in practice. AMD: MI300X's Infinity Fabric 7 x 64 GB/s
# per direction; MI250X ~100 per direction (one link between the GCDs' peers: an assumption).
INTRA_NODE_BUS_GBPS = {
    "H200": 450,
    "H100": 450,
    "A100": 300,
    "A100-40GB": 300,
    "L40S": 25,
    "A10G": 25,
    "V100": 150,
    "MI300X": 448,
    "MI250X": 100,
}
# This machine's CPU ranks: gloo over loopback TCP, an assumption (not measured).
CPU_BUS_GBPS = 1

# launch.sh's ranks on a machine without a GPU (its `NUM_GPUS=${NUM_GPUS:-2}`; tests/unit/test_plan.py reads it there).
LAUNCH_CPU_RANKS = 2


def machine_ranks() -> tuple[int, str]:
    """The ranks launch.sh starts on this machine, and what they are: NUM_GPUS when set, else every GPU, else
    LAUNCH_CPU_RANKS CPU ranks (also with DS_ACCELERATOR=cpu)."""
    import os

    gpus = machine_gpus()
    if os.environ.get("NUM_GPUS", "").isdigit() and int(os.environ["NUM_GPUS"]) > 0:
        ranks = int(os.environ["NUM_GPUS"])
        return ranks, f"{ranks} {'GPU' if gpus else 'CPU'} ranks (NUM_GPUS)"
    if gpus:
        return gpus, f"its {gpus} GPUs"
    return LAUNCH_CPU_RANKS, f"{LAUNCH_CPU_RANKS} CPU ranks (no GPU: launch.sh's default; NUM_GPUS sets another)"


def ranks_per_node(flags: Flags) -> int:
    return machine_ranks()[0] if flags.gpus_per_node is None else flags.gpus_per_node


def machine_gpus() -> int:
    """The GPUs launch.sh would use here (none with DS_ACCELERATOR=cpu)."""
    import os

    import torch

    return torch.cuda.device_count() if os.environ.get("DS_ACCELERATOR") != "cpu" else 0


def machine_memory() -> int:
    """This machine's physical memory in bytes (what the CPU ranks launch.sh starts here share)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_device(flags: Flags) -> tuple[str, float]:
    """What a plan is for, and the bytes each rank may hold: this machine's CPU ranks (no --gpus-per-node and no GPU
    here), each an equal share of its memory, or `--gpu`'s memory per GPU (`GPU_MEMORY_GIB`)."""
    if flags.gpus_per_node is None and machine_gpus() == 0:
        return "CPU", machine_memory() / machine_ranks()[0]
    gpu = flags.gpu.upper()
    if gpu not in GPU_MEMORY_GIB:
        raise ConfigError(f"unknown --gpu {flags.gpu}: use one of {', '.join(GPU_MEMORY_GIB)}")
    return gpu, GPU_MEMORY_GIB[gpu] * 2**30


def bus_bandwidth(gpu: str) -> float:
    """Bytes/s of a tensor-parallel group's all-reduce on one node of `gpu`s (INTRA_NODE_BUS_GBPS; CPU ranks:
    CPU_BUS_GBPS)."""
    return (INTRA_NODE_BUS_GBPS.get(gpu) or CPU_BUS_GBPS) * 1e9
