"""Real shapes of families that set something between the pieces (docs/families.md): the published config.jsons'
fields that shape the model or change what it computes. Parameter counts: tests/unit/test_plan.py (arithmetic
from these fields, and the checkpoints' published counts)."""

# Gemma 2 27B (google/gemma-2-27b): soft-capped attention (50) and logits (30), local (4,096) / global layers
# alternating, pre- and post-norms, tied head, scaled embedding. 27,227,128,320 parameters (the card's 27.2B).
GEMMA2_27B = dict(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=4608,
    intermediate_size=36864,
    num_hidden_layers=46,
    num_attention_heads=32,
    num_key_value_heads=16,
    head_dim=128,
    query_pre_attn_scalar=144,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
# Gemma 3 27B's language model (google/gemma-3-27b-pt's text_config, as gemma3_text): 5 local layers (window 1,024,
# rope theta 1e4) to 1 global (theta 1e6, linear scaling x8), q/k norms. 27,009,346,304 parameters: the card's 27.4B
# less the SigLIP vision encoder and projector (~0.42B) that the text-only model leaves out.
GEMMA3_27B = dict(
    model_type="gemma3_text",
    vocab_size=262208,
    hidden_size=5376,
    intermediate_size=21504,
    num_hidden_layers=62,
    num_attention_heads=32,
    num_key_value_heads=16,
    head_dim=128,
    query_pre_attn_scalar=168,
    sliding_window=1024,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
    },
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
# SmolLM3-3B (HuggingFaceTB/SmolLM3-3B): every 4th layer without rotary (NoPE), tied head. 3,075,098,624 (3.08B).
SMOLLM3_3B = dict(
    model_type="smollm3",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=4,
    no_rope_layer_interval=4,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
    max_position_embeddings=65536,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128012,
    pad_token_id=128004,
)
# OLMo 3 7B (allenai/Olmo-3-1025-7B): 3 sliding-window layers (4,096) to 1 full, post-norms, q/k norms over all
# heads, untied head. 7,298,011,136 parameters (the card's 7.3B).
OLMO3_7B = dict(
    model_type="olmo3",
    vocab_size=100278,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    sliding_window=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=65536,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=100257,
    pad_token_id=100277,
)
# Granite 3.1 8B (ibm-granite/granite-3.1-8b-base): muP-style multipliers on the embedding (x12), attention scores,
# residual branches (x0.22) and logits (/16), tied head. 8,170,848,256 parameters (the card's 8.17B).
GRANITE_3_8B = dict(
    model_type="granite",
    vocab_size=49155,
    hidden_size=4096,
    intermediate_size=12800,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    embedding_multiplier=12.0,
    attention_multiplier=0.0078125,
    residual_multiplier=0.22,
    logits_scaling=16.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0},
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
FAMILY_PRESETS: dict[str, dict] = {
    "gemma-2-27b": GEMMA2_27B,
    "gemma-3-27b": GEMMA3_27B,
    "smollm3-3b": SMOLLM3_3B,
    "olmo-3-7b": OLMO3_7B,
    "granite-3.1-8b": GRANITE_3_8B,
}
