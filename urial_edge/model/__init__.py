"""Models: the registry, the store, the Hub, GGUF import, loading weights, the tokenizer, the MLX backend."""
