"""Data: sources, the tokenizer, instruction and chat examples, packed cached blocks, the order of batches."""
