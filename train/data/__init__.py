"""Data: sources, the tokenizer, instruction and chat examples and their packing, packed cached blocks, the training
and validation splits, the order of batches."""
