"""Validation loss with the pipeline engine's own forward-only schedule."""

from datasets import Dataset
from deepspeed.runtime.pipe.engine import PipelineEngine

from train.batches import eval_micro_batches


def evaluate(
    engine: PipelineEngine, blocks: Dataset, micro_batch_size: int, micro_batches: int, n_blocks: int
) -> float:
    """Mean next-token loss over the first `n_blocks` validation blocks (a multiple of one global batch).

    `eval_batch` averages its micro-batches and the data-parallel replicas, and every step
    has the same number of equal-length blocks, so the mean of steps is the mean over blocks.
    """
    dp_rank, dp_size = engine.grid.data_parallel_id, engine.grid.data_parallel_size
    batches = eval_micro_batches(blocks, micro_batch_size, dp_rank, dp_size, n_blocks)
    losses = [
        engine.eval_batch(iter(batches[i : i + micro_batches])).item() for i in range(0, len(batches), micro_batches)
    ]
    return sum(losses) / len(losses)
