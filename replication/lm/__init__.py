"""The language-model side of the pipeline: the corpus, the models, and their activations (token
windows and activation caches)."""
