"""Any supported Hugging Face causal LM as DeepSpeed pipeline layers: its structure, the layers, the loss, FLOPs,
presets, hub names, and the conversion between Hugging Face weights and pipeline layers."""

import logging

# bitsandbytes 0.50.2 on CPU looks for an optional kernel package when it is imported (peft imports it) and warns on
# every rank without it; its own CPU path is used instead, the one the QLoRA tests compare with transformers'.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
