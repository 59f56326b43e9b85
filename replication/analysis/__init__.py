"""Matching and its statistics: the exact assignment solver, SAE latent matching, seed stability, and
the statistics every figure uses."""
