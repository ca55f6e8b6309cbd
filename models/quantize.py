"""QLoRA's 4-bit base: the decoder layers' linear weights as bitsandbytes' `Linear4bit`, quantized on each stage from
the weights it loaded, as `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does.

transformers quantizes every `nn.Linear` (and GPT-2's `Conv1D`, transposed) except the LM head; so does this, inside
the decoder layers (embeddings, norms and the head stay in the training dtype). A mixture of experts' fused 3-D
expert weights (transformers 5.24's `mlp.experts.gate_up_proj` / `down_proj`) are no `nn.Linear`: transformers 5.24
with bitsandbytes 0.50.2 keeps them, and the routers, in the compute dtype, and so does this (`expert_weights`
counts them for the run's line and the planner); most of a MoE's weights are experts, so QLoRA saves little there.
A weight is quantized when it moves onto the accelerator (bitsandbytes' `Params4bit.to`), block by block (64
values) to NF4 or FP4, with the block scales themselves quantized once more with `double_quant`. peft then wraps
each quantized module in its `lora.bnb.Linear4bit`, which adds the adapters in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.architecture import DECODER, is_conv1d, is_linear

if TYPE_CHECKING:
    from models.pipeline import CausalLMPipeline

BLOCK = 64  # bitsandbytes' 4-bit block size (the absmax of every 64 weights is stored)


@dataclass(frozen=True)
class Quantization:
    """`--load-in-4bit` and its flags (BitsAndBytesConfig's bnb_4bit_quant_type and bnb_4bit_use_double_quant)."""

    quant_type: str = "nf4"
    double_quant: bool = False

    def bytes_per_weight(self) -> float:
        """Memory of a quantized weight: 4 bits, plus its block's absmax (fp32, or 8-bit with a second level)."""
        return 0.5 + (1 + 4 / 256 if self.double_quant else 4) / BLOCK


def check_4bit_available() -> None:
    """ValueError with the fix when bitsandbytes cannot run its 4-bit path here."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError(f"--load-in-4bit needs bitsandbytes ({e}); pip install bitsandbytes==0.50.2") from None
    try:  # a tiny layer, quantized and run on this device, as the stages will
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.zeros(1, 64, device=device))
    except Exception as e:  # bitsandbytes raises many kinds when a backend is missing
        raise ValueError(
            f"--load-in-4bit: bitsandbytes {bnb.__version__} cannot run its 4-bit layers on {device} ({e}); "
            "train LoRA on a bf16 base instead (drop --load-in-4bit)"
        ) from None


def _drop_quant_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        del state_dict[key]


@torch.no_grad()
def quantize_4bit(layer: nn.Module, quantization: Quantization, compute_dtype: torch.dtype, device: str) -> int:
    """Replace every linear module inside `layer` by a frozen `Linear4bit` holding its weights, quantized on
    `device`. Returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(layer.named_modules()):
        if not name or not is_linear(module):
            continue
        weight = module.weight.t() if is_conv1d(module) else module.weight  # Conv1D is x @ W
        out_features, in_features = weight.shape
        quantized = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=quantization.double_quant,
            quant_type=quantization.quant_type,
        )
        quantized.weight = bnb.nn.Params4bit(
            weight.detach().contiguous().cpu(),
            requires_grad=False,
            compress_statistics=quantization.double_quant,
            quant_type=quantization.quant_type,
            module=quantized,
        )
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        # bitsandbytes 0.50.2 repacks a 4-bit weight for a CPU inference kernel at its first eval-mode forward on
        # AVX512-bf16 CPUs (nn/modules.py:613): other numerics than training's (and a reshape error for widths
        # that are not a multiple of 64 blocks). Evaluation here must compute what training computes.
        quantized.support_avx512bf16_for_cpu = False
        # The frozen 4-bit weights are quantized again from --model at every start: a (LoRA) checkpoint need not
        # hold their block scales, which `Linear4bit` adds to its state dict beside the weight.
        quantized.register_state_dict_post_hook(_drop_quant_state)
        parent_name, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, child, quantized.to(device))
        replaced += 1
    return replaced


def quantize_stage(pipe: CausalLMPipeline, quantization: Quantization, compute_dtype: torch.dtype) -> int:
    """QLoRA: this stage's decoder layers' linear weights to 4 bits (bitsandbytes), quantized on the device
    as they move there. Call after the base weights are loaded, before the adapters. Returns the modules."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    layers = pipe.arch.pipeline_layers()
    return sum(
        quantize_4bit(module, quantization, compute_dtype, device)
        for index, module in pipe.stage_modules()
        if layers[index].kind == DECODER
    )


def quantized_parameters(layer: nn.Module) -> int:
    """Weights inside `layer` that `quantize_4bit` would quantize (counted on a meta module)."""
    return sum(m.weight.numel() for name, m in layer.named_modules() if name and is_linear(m))


def expert_weights(module: nn.Module) -> int:
    """The fused expert weights inside `module` (its 3-D parameters), which stay in the compute dtype."""
    return sum(p.numel() for p in module.parameters() if p.ndim == 3)


def kept_weights(module: nn.Module) -> int:
    """The weights inside `module` not held in 4 bits."""
    return sum(p.numel() for p in module.parameters() if getattr(p, "quant_state", None) is None)


def parameter_count(param: torch.Tensor) -> int:
    """The weights a parameter stands for: a 4-bit one packs two in a byte, its original shape is in its quant
    state."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()
