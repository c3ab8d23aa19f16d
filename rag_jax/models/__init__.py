from rag_jax.models.gpt import GPT, GPTConfig, init_cache  # noqa: F401
