"""Sparse autoencoders: the architectures (one interface), the TopK kernels, training, the checkpoint
layout, and the latent directions that matching reads."""
