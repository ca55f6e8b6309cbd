"""The presets of models/family_presets.py count what arithmetic on their config fields gives, which is the count
the checkpoints publish (27,227,128,320 for Gemma-2-27B; Gemma-3-27B's language model 27,009,346,304, its card's
27.4B including the ~0.42B vision encoder; SmolLM3-3B 3.08B; OLMo-3-7B 7.3B; Granite-3.1-8B 8.17B).
tests/unit/test_plan.py checks that the planner's count is the count of the model transformers builds."""

import pytest

from models.architecture import discover
from models.family_presets import FAMILY_PRESETS
from models.presets import resolve_model_config

# Norm weights of one decoder layer, by family, as d (hidden) and the head width: pre/post norms around attention
# and MLP (Gemma 2/3: four), Gemma 3's q/k norms over one head, OLMo 3's over all query and key heads.
NORMS = {
    "gemma2": lambda d, heads, kv, hd: 4 * d,
    "gemma3_text": lambda d, heads, kv, hd: 4 * d + 2 * hd,
    "smollm3": lambda d, heads, kv, hd: 2 * d,
    "olmo3": lambda d, heads, kv, hd: 2 * d + heads * hd + kv * hd,
    "granite": lambda d, heads, kv, hd: 2 * d,
}
PUBLISHED = {
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-27b": 27_009_346_304,
    "smollm3-3b": 3.08e9,
    "olmo-3-7b": 7.3e9,
    "granite-3.1-8b": 8.17e9,
}


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_family_preset_counts_its_config_arithmetic_and_the_published_count(preset):
    c = FAMILY_PRESETS[preset]
    d, ff, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", d // heads)
    attention = 2 * d * heads * hd + 2 * d * kv * hd  # q, o and k, v; no biases
    layer = attention + 3 * d * ff + NORMS[c["model_type"]](d, heads, kv, hd)  # gate, up, down
    expected = layers * layer + d + vocab * d * (1 if c["tie_word_embeddings"] else 2)
    assert discover(resolve_model_config(preset, None, None)).parameters() == expected
    published = PUBLISHED[preset]
    assert expected == published if isinstance(published, int) else round(expected / 1e9, 2) == published / 1e9
