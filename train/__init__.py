"""Data, tokenizer, training loop, evaluation, checkpoints and metrics."""
