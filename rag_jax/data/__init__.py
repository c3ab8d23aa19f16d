"""Data: the input pipeline (`pipeline`: token arrays -> batches), tokenizers, prepared corpora.

Importing a submodule does not import the others: a sampler needs `tokenizers` and no pipeline.
"""
