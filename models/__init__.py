"""Any supported Hugging Face causal LM as DeepSpeed pipeline layers: its structure, the layers and their attention
masks, the loss, FLOPs, presets, hub names, LoRA and 4-bit bases, and the conversion between Hugging Face weights
and pipeline layers (exports that transformers 4.x and 5.x read alike)."""

import logging

# bitsandbytes 0.50.2 on CPU looks for an optional kernel package when it is imported (peft imports it) and warns on
# every rank without it; its own CPU path is used instead, the one the QLoRA tests compare with transformers'.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
