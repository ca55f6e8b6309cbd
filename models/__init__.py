"""Any supported Hugging Face causal LM as DeepSpeed pipeline layers: its structure, the layers, the loss, FLOPs,
presets, hub names, and the conversion between Hugging Face weights and pipeline layers."""
