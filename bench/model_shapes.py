"""Model shapes the GPU benchmark scripts build with random weights (``LlamaConfig`` keyword args)."""

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
"""Llama-3-8B: 32 layers, hidden 4096, grouped-query attention with 8 key/value heads."""

TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    max_position_embeddings=512,
)
"""The CPU smoke-test model (``--tiny``)."""
