"""Which attention mask a decoder layer gets: transformers' own masking utilities, fed the positions.

Positions restart at 0 for every document of a packed block (`--attention document`); transformers 5.24's
`create_causal_mask` / `create_sliding_window_causal_mask` detect that from `position_ids` when no 2D mask is
given (`find_packed_sequence_indices`: a new document wherever the position does not grow by 1) and build a
block-causal mask for the layer's kernel: a boolean [B, 1, S, S] mask for SDPA, or none for flash attention,
which finds the documents from `position_ids` itself (its variable-length path). Positions 0..S-1 (one
document per row, `--attention causal` and sampling) give no mask at all for SDPA, which then runs its
`is_causal` kernel, as before; a sliding window longer than the block is a plain causal mask too.
"""

import torch
from transformers import PretrainedConfig

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_attention_type(config: PretrainedConfig, index: int) -> str:
    """SLIDING or FULL for decoder layer `index`, as the family's model picks its mask: `layer_types` where the
    config has them (Qwen2/3), else a window for every layer when `sliding_window` is set (Mistral, Phi-3)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return SLIDING if layer_types[index] == SLIDING else FULL
    return SLIDING if getattr(config, "sliding_window", None) is not None else FULL


def attention_mask(
    config: PretrainedConfig, attention_type: str, hidden: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor | None:
    """The mask transformers' own model would give this layer for a block with these positions (no padding mask,
    no cache: every token of a block is real; padding is a document of its own, labelled -100)."""
    # Imported here: transformers 5.24's masking_utils imports torch._dynamo (~2 s), which the preflight never needs.
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = create_sliding_window_causal_mask if attention_type == SLIDING else create_causal_mask
    return make(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
