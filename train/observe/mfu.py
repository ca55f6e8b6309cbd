"""Accelerator peak FLOP/s and MFU = achieved model FLOP/s per device / the device's dense peak.

The model FLOPs per token come from `models/flops.py` (PaLM's 6N + 12 L d T).
"""

from deepspeed.accelerator import get_accelerator

# Dense (no sparsity) peak TFLOP/s per device from the vendors' datasheets; first match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9}),
]


def training_dtype(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"


def device_name() -> str:
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return accelerator.device_name()


def peak_tflops(dtype: str, override: float | None = None) -> float | None:
    """The device's peak for `dtype`, or None where unknown (a CPU, an unlisted card) and not given."""
    if override:
        return override
    name = device_name()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(dtype) or None
    return None


def tflops_and_mfu(flops_token: float, tokens_per_sec: float, devices: int, peak: float | None) -> dict:
    achieved = flops_token * tokens_per_sec / devices / 1e12
    return {"tflops_per_device": achieved, "mfu": achieved / peak if peak else None}
