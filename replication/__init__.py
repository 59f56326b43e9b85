"""Replication of "Sparse Autoencoders Trained on the Same Data Learn Different Features".

The package reads as the pipeline: `lm` (corpus, models, activations) -> `sae` (architectures,
kernels, training, checkpoints, directions) -> `analysis` (assignment, matching, stability, stats)
-> `studies` (ablations and the companion studies); `experiments` ties them into seed families,
`plotting` draws, `paths` and `io` hold the files.

Short imports keep working for every module, e.g. `from replication import experiments, matching`:
they are resolved on first use (so `import replication` stays light).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = {
    "corpus": "lm.corpus", "models": "lm.models", "activations": "lm.activations",
    "architectures": "sae.architectures", "kernels": "sae.kernels", "training": "sae.training",
    "checkpoints": "sae.checkpoints", "directions": "sae.directions",
    "assignment": "analysis.assignment", "matching": "analysis.matching", "stability": "analysis.stability",
    "stats": "analysis.stats",
    "ablations": "studies.ablations", "interpretability": "studies.interpretability", "explainers": "studies.explainers",
    "per_latent": "studies.per_latent", "splicing": "studies.splicing", "random_control": "studies.random_control",
    "subspaces": "studies.subspaces", "synthetic": "studies.synthetic", "pooling": "studies.pooling",
    "live_only": "studies.live_only", "orphans": "studies.orphans", "convergence": "studies.convergence",
    "consistency": "studies.consistency", "companion": "studies.companion", "streaming": "lm.streaming", "hub": "lm.hub",
    "sparse_assignment": "analysis.sparse_assignment",
}
"""Short name -> module inside the package (`from replication import matching`)."""


def __getattr__(name: str) -> Any:
    """Short module names, and `replication.compare_saes` / `replication.Report`, imported on first use."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    if name in ("compare_saes", "Report"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'replication' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES) | {"compare_saes", "Report"})
