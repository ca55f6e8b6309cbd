"""GPT-2 as DeepSpeed pipeline layers, its loss, presets and Hugging Face weight conversion."""
