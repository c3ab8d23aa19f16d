"""rag_jax: Random Activations for Generation (not retrieval-augmented generation)."""
