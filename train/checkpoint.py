"""Saving the pipeline through DeepSpeed, and turning the saved layers into a Hugging Face model."""

from pathlib import Path

import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import GPT2Config, PreTrainedTokenizerBase

from models.hf_weights import export_hf_model


def save_and_export(
    engine: PipelineEngine, output_dir: Path, config: GPT2Config, tokenizer: PreTrainedTokenizerBase, step: int
) -> Path:
    """DeepSpeed checkpoint `<output_dir>/checkpoints/step_<N>`, then an HF export in `<output_dir>/hf`."""
    checkpoints = output_dir / "checkpoints"
    tag = f"step_{step}"
    engine.save_checkpoint(str(checkpoints), tag=tag, client_state={"step": step})
    dist.barrier()  # every stage's layer files are on disk before rank 0 reads them
    hf_dir = output_dir / "hf"
    if dist.get_rank() == 0:
        export_hf_model(checkpoints / tag, config, hf_dir, tokenizer)
    dist.barrier()
    return hf_dir
