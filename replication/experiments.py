"""End-to-end experiments the figure notebooks call: a family of SAEs that differ only in seed.

`seed_family(spec)` builds (or reuses) the activation cache, trains every seed in one pass over
it (or loads the finished checkpoints), measures each SAE's firing counts on the held-out split,
and matches all seed pairs. Every stage is cached under `data/` by its settings, so the figure
notebooks that share a family (Figures 1, 2, 3, A1, A2, A3) pay for it once.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import paths
from .activations import ActivationCache, ActivationSettings, build_activation_cache
from .directions import LatentDirections
from .io import settings_key


@dataclass
class FamilySpec:
    """Everything that defines a seed family: activations, SAE architecture, training, seeds."""

    # activations
    model_name: str = "smollm2-135m"
    hook: str = "blocks.15.hook_mlp_out"
    n_train_tokens: int = 1_000_000
    n_heldout_tokens: int = 100_000
    seq_len: int = 256
    model_dtype: str = "bfloat16"
    corpus_sources: tuple[str, ...] | None = None
    corpus_max_tokens: int | None = None
    random_model: bool = False           # train on the random-initialised control model
    # SAE and training
    architecture: str = "topk"
    n_latents: int = 4096
    k: int | None = 32
    l1_coefficient: float = 0.2
    seeds: tuple[int, ...] = tuple(range(9))
    batch_size: int = 1024
    n_tokens: int | None = None          # training budget; None = one epoch of the cached tokens
    data_seed: int = 0
    lr: float | None = None              # None: sparsify's 2e-4 / sqrt(n_latents / 2**14), times lr_scale
    lr_scale: float = 1.0                # >1 compensates for runs far shorter than the paper's ~122k steps
    select_dtype: str | None = None      # "bfloat16": pick the top-k from a bf16 encoder matmul (as sparsify's autocast)
    device: str = "cpu"
    extra_hooks: tuple[str, ...] = field(default_factory=tuple)  # more hooks cached in the same pass

    def activation_settings(self) -> ActivationSettings:
        hooks = tuple(dict.fromkeys((self.hook, *self.extra_hooks)))
        return ActivationSettings(
            model_name=self.model_name, hooks=hooks, n_train_tokens=self.n_train_tokens,
            n_heldout_tokens=self.n_heldout_tokens, seq_len=self.seq_len, model_dtype=self.model_dtype,
            corpus_sources=tuple(self.corpus_sources) if self.corpus_sources else None,
            corpus_max_tokens=self.corpus_max_tokens, random_init=self.random_model,
        )

    def training_key(self) -> str:
        """Hash of everything that determines the weights except the seed."""
        d = asdict(self)
        for key in ("seeds", "device", "extra_hooks"):
            d.pop(key)
        d["activations"] = self.activation_settings().key()
        return settings_key(d)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "FamilySpec":
        """Build from a notebook's parameter dict, ignoring keys that are not spec fields."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        for key in ("seeds", "corpus_sources", "extra_hooks"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


@dataclass
class SeedFamily:
    """A trained seed family with its held-out firing counts and (lazily) all pairwise matchings."""

    spec: FamilySpec
    cache: ActivationCache
    results: list                       # training.TrainResult per seed
    firing: np.ndarray                  # int64 [n_seeds, n_latents] held-out firing counts
    n_heldout: int
    timings: dict[str, float]

    @property
    def directions(self) -> list[LatentDirections]:
        return [r.sae.latent_directions(name=f"seed{s}") for r, s in zip(self.results, self.spec.seeds)]

    @cached_property
    def matching(self):
        """`stability.FamilyMatching` over every seed pair (cached on disk per pair)."""
        from .stability import FamilyMatching

        start = time.time()
        fam = FamilyMatching(self.directions)
        self.timings["matching_s"] = time.time() - start
        return fam

    def training_table(self):
        """One row per seed: FVU, L0, dead fraction, tokens, wall time, tokens/s."""
        import pandas as pd

        rows = []
        for seed, res in zip(self.spec.seeds, self.results):
            m = res.metrics
            rows.append({"seed": seed, **{k: m.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens", "wall_time_s", "tokens_per_s")}})
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for figure JSON: settings, training metrics, timings."""
        table = self.training_table()
        return {
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.spec).items()},
            "d_in": self.cache.d_model,
            "activation_cache": self.cache.folder.name,
            "training": table.to_dict(orient="records"),
            "mean_fvu": float(table.fvu.mean()),
            "mean_l0": float(table.l0.mean()),
            "mean_dead_fraction": float(table.dead_fraction.mean()),
            "heldout_tokens": self.n_heldout,
            "timings_s": dict(self.timings),
        }


def family_dir(spec: FamilySpec) -> Path:
    """Checkpoint folder of a family: `data/saes/<model>-<arch>-<n>-k<k>-<key>/`."""
    tag = f"{spec.model_name.replace('/', '_')}{'-random' if spec.random_model else ''}-{spec.architecture}-{spec.n_latents}-k{spec.k}"
    return paths.CHECKPOINTS_DIR / f"{tag}-{spec.training_key()}"


def seed_family(spec: FamilySpec, progress: bool = True, model=None) -> SeedFamily:
    """Build the activation cache, train (or load) every seed, and count held-out firing."""
    from .sae import firing_counts
    from .training import DataConfig, TrainConfig, train_saes

    timings: dict[str, float] = {}
    start = time.time()
    cache = build_activation_cache(spec.activation_settings(), device=spec.device, model=model, progress=progress)
    timings["activations_s"] = time.time() - start
    hook = spec.hook
    lr = spec.lr if spec.lr is not None else TrainConfig(n_latents=spec.n_latents).resolved_lr() * spec.lr_scale
    configs = [
        TrainConfig(architecture=spec.architecture, n_latents=spec.n_latents, k=spec.k, seed=seed, lr=lr,
                    l1_coefficient=spec.l1_coefficient, select_dtype=spec.select_dtype, device=spec.device)
        for seed in spec.seeds
    ]
    data = DataConfig(batch_size=spec.batch_size, n_tokens=spec.n_tokens, data_seed=spec.data_seed,
                      input_scale=cache.input_scale(hook), hookpoint=hook, activations_hash=cache.content_hash(hook))
    root = family_dir(spec)
    start = time.time()
    results = train_saes(cache.train(hook), configs, data, out_dirs=[root / f"seed{s}" for s in spec.seeds],
                         heldout=cache.heldout(hook), progress=progress)
    timings["training_s"] = time.time() - start
    start = time.time()
    heldout = cache.heldout(hook)
    firing = np.stack([firing_counts(r.sae, heldout, device=spec.device, progress=False) for r in results])
    timings["firing_s"] = time.time() - start
    return SeedFamily(spec, cache, results, firing, int(heldout.shape[0]), timings)
