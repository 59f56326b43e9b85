"""Replication of "Sparse Autoencoders Trained on the Same Data Learn Different Features".

One module per job: `paths`, `io`, `corpus`, `models`, `activations`, `sae`, `training`,
`checkpoints`, `matching`, `stability`, `plotting`.
"""
__version__ = "0.1.0"
