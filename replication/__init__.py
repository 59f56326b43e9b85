"""Replication of "Sparse Autoencoders Trained on the Same Data Learn Different Features".

One module per job: `paths`, `io`, `corpus`, `models`, `activations`, `sae`, `training`,
`checkpoints`, `matching`, `stability`, `plotting`.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`replication.compare_saes` / `replication.Report`, imported on first use (keeps `import replication` light)."""
    if name in ("compare_saes", "Report"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'replication' has no attribute {name!r}")
