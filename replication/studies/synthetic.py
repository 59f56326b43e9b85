"""Synthetic ground truth: data from a known sparse dictionary, and recovery scores (issue #7, item 5).

The generator has two kinds of ground truth:

- **separated features**: unit directions that fire independently (probability
  `p_separated`) with a positive magnitude (uniform in `magnitude_range`). A good SAE can give
  each its own latent, and every seed should find the same one.
- **low-rank groups**: an `r`-dimensional subspace that fires as a unit (probability `p_group`)
  with an isotropic Gaussian coefficient vector inside it. Any basis of the subspace explains
  the data equally well, so the subspace is identifiable but its individual directions are not:
  the extreme case of the companion study's "basis ambiguity".

All ground-truth directions are mutually orthogonal when they fit in `d` (else random unit
vectors, nearly orthogonal in high dimension). `train_synthetic_family` trains a seed family on
an in-memory sample with `training.train_saes`; the score functions say which latents found
which ground truth, and whether the latents of different seeds agree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import paths
from ..io import settings_key
from ..sae.checkpoints import seed_dir
from .subspaces import principal_angle_cosines

SYNTHETIC_DIR: Path = paths.DATA_DIR / "synthetic"


@dataclass(frozen=True)
class SyntheticSpec:
    """The ground-truth dictionary and its firing statistics."""

    d: int = 64
    n_separated: int = 32
    n_groups: int = 4
    group_rank: int = 4
    p_separated: float = 0.05
    p_group: float = 0.05
    magnitude_range: tuple[float, float] = (0.5, 1.5)
    group_scale: float = 1.0          # coefficient std per group direction
    noise_std: float = 0.01
    dictionary_seed: int = 0

    def __post_init__(self) -> None:
        if self.d <= 0 or self.n_separated < 0 or self.n_groups < 0 or self.group_rank <= 0:
            raise ValueError(f"sizes must be positive: d={self.d}, n_separated={self.n_separated}, "
                             f"n_groups={self.n_groups}, group_rank={self.group_rank}")
        if self.n_separated + self.n_groups == 0:
            raise ValueError("the dictionary needs at least one separated feature or group")
        if self.group_rank > self.d:
            raise ValueError(f"group_rank {self.group_rank} exceeds d {self.d}")
        for name in ("p_separated", "p_group"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability; got {getattr(self, name)}")
        lo, hi = self.magnitude_range
        if not 0 < lo <= hi:
            raise ValueError(f"magnitude_range must satisfy 0 < low <= high; got {self.magnitude_range}")

    @property
    def n_directions(self) -> int:
        return self.n_separated + self.n_groups * self.group_rank


@dataclass
class GroundTruth:
    """Unit separated features `[n_separated, d]` and orthonormal group bases `[n_groups, r, d]`."""

    spec: SyntheticSpec
    separated: np.ndarray
    groups: np.ndarray


def make_ground_truth(spec: SyntheticSpec) -> GroundTruth:
    """Draw the dictionary from `spec.dictionary_seed` (orthogonal when it fits in d)."""
    rng = np.random.default_rng(spec.dictionary_seed)
    n, r = spec.n_directions, spec.group_rank
    if n <= spec.d:
        q, _ = np.linalg.qr(rng.standard_normal((spec.d, spec.d)))
        dirs = q.T[:n]
    else:
        dirs = rng.standard_normal((n, spec.d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    separated = dirs[:spec.n_separated]
    groups = dirs[spec.n_separated:].reshape(spec.n_groups, r, spec.d)
    # each group's own basis must be orthonormal even when the dictionary is not
    groups = np.stack([np.linalg.qr(g.T)[0].T for g in groups]) if spec.n_groups else groups
    return GroundTruth(spec, separated.astype(np.float64), groups.astype(np.float64))


def sample(truth: GroundTruth, n: int, seed: int = 0) -> np.ndarray:
    """float32 `[n, d]` samples: sparse separated features + active groups + Gaussian noise."""
    s = truth.spec
    if n <= 0:
        raise ValueError(f"n must be positive; got {n}")
    rng = np.random.default_rng(seed)
    lo, hi = s.magnitude_range
    coef = (rng.random((n, s.n_separated)) < s.p_separated) * rng.uniform(lo, hi, (n, s.n_separated))
    x = coef @ truth.separated
    if s.n_groups:
        on = rng.random((n, s.n_groups)) < s.p_group
        z = rng.standard_normal((n, s.n_groups, s.group_rank)) * s.group_scale * on[:, :, None]
        x += np.einsum("ngr,grd->nd", z, truth.groups)
    x += s.noise_std * rng.standard_normal(x.shape)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- recovery scores
def _unit(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def separated_recovery(decoder: np.ndarray, truth: GroundTruth) -> np.ndarray:
    """Per separated feature: the highest cosine of any decoder row with it `[n_separated]`."""
    if truth.spec.n_separated == 0:
        return np.zeros(0)
    return (truth.separated @ _unit(decoder).T).max(axis=1)


def group_energy(decoder: np.ndarray, truth: GroundTruth) -> np.ndarray:
    """`[n_latents, n_groups]`: squared norm of each unit decoder row inside each group subspace."""
    proj = np.einsum("grd,nd->ngr", truth.groups, _unit(decoder))
    return (proj ** 2).sum(-1)


def assign_latents(decoder: np.ndarray, truth: GroundTruth, cos_threshold: float = 0.9,
                   energy_threshold: float = 0.9) -> np.ndarray:
    """Label per latent: `i >= 0` separated feature i (cosine > threshold), `-(g+1)` group g
    (energy in its subspace > threshold), or `NO_TRUTH` for neither."""
    dec = _unit(decoder)
    labels = np.full(dec.shape[0], NO_TRUTH, dtype=np.int64)
    if truth.spec.n_separated:
        cos = dec @ truth.separated.T
        best = cos.argmax(1)
        hit = cos[np.arange(len(best)), best] > cos_threshold
        labels[hit] = best[hit]
    if truth.spec.n_groups:
        energy = group_energy(dec, truth)
        g = energy.argmax(1)
        hit = (energy[np.arange(len(g)), g] > energy_threshold) & (labels == NO_TRUTH)
        labels[hit] = -(g[hit] + 1)
    return labels


NO_TRUTH = -(10**9)


def group_subspace_recovery(decoder: np.ndarray, truth: GroundTruth, energy_threshold: float = 0.9) -> dict[str, Any]:
    """Per group: how many latents live in it, and the principal cosines between the span of
    those latents and the group (min cosine 1 = subspace recovered; rank-deficient span -> 0)."""
    dec = _unit(decoder)
    labels = assign_latents(dec, truth, energy_threshold=energy_threshold)
    r = truth.spec.group_rank
    n_latents, min_cos, individual = [], [], []
    for g, basis in enumerate(truth.groups):
        rows = dec[labels == -(g + 1)]
        n_latents.append(int(len(rows)))
        if len(rows) < r:
            min_cos.append(0.0)          # fewer latents than dimensions cannot span the group
        else:
            _, _, vt = np.linalg.svd(rows, full_matrices=False)
            min_cos.append(float(principal_angle_cosines(basis.T, vt[:r].T).min()))
        # the ground-truth *basis* directions: best cosine of any latent with each of them
        individual.append((basis @ dec.T).max(axis=1))
    return {"latents_per_group": n_latents, "subspace_min_cos": min_cos,
            "basis_direction_max_cos": np.stack(individual) if individual else np.zeros((0, r))}


def cross_seed_agreement(decoders: Sequence[np.ndarray], truth: GroundTruth, cos_threshold: float = 0.9,
                         energy_threshold: float = 0.9) -> dict[str, Any]:
    """For every ordered seed pair: each latent's best decoder cosine with a latent of the other
    seed *that has the same label*, split by kind (separated-feature latents vs group latents).

    Basis ambiguity shows up as high agreement for separated latents and low agreement for group
    latents, although both kinds are individually near their ground truth.
    """
    units = [_unit(d) for d in decoders]
    labels = [assign_latents(d, truth, cos_threshold, energy_threshold) for d in units]
    sep, grp = [], []
    for i, j in ((i, j) for i in range(len(units)) for j in range(len(units)) if i != j):
        cos = units[i] @ units[j].T
        same = labels[i][:, None] == labels[j][None, :]
        best = np.where(same, cos, -1.0).max(axis=1)
        kind_i = labels[i]
        sep.append(best[kind_i >= 0])
        grp.append(best[(kind_i < 0) & (kind_i != NO_TRUTH)])
    sep_all = np.concatenate(sep) if sep else np.zeros(0)
    grp_all = np.concatenate(grp) if grp else np.zeros(0)
    return {"separated_best_cos": sep_all, "group_best_cos": grp_all,
            "separated_reproduced": float((sep_all > cos_threshold).mean()) if sep_all.size else float("nan"),
            "group_reproduced": float((grp_all > cos_threshold).mean()) if grp_all.size else float("nan"),
            "labels": labels}


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class SyntheticTraining:
    """SAE family settings for the synthetic data (seeds differ only in initialisation)."""

    n_latents: int = 96
    k: int = 8
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_samples: int = 100_000
    n_tokens: int = 1_000_000
    batch_size: int = 512
    lr: float | None = None
    lr_scale: float = 1.0
    data_seed: int = 0
    sample_seed: int = 1
    device: str = "cpu"


def train_synthetic_family(spec: SyntheticSpec, train: SyntheticTraining, cache: bool = True,
                           progress: bool = False) -> tuple[GroundTruth, list, np.ndarray]:
    """Sample the data, train every seed on it (cached under `data/synthetic/<key>/`), return
    (ground truth, `TrainResult`s, held-out sample)."""
    from ..sae.training import DataConfig, TrainConfig, learning_rate, train_saes

    truth = make_ground_truth(spec)
    x = sample(truth, train.n_samples, seed=train.sample_seed)
    heldout = sample(truth, max(1000, train.n_samples // 10), seed=train.sample_seed + 10_000)
    lr = learning_rate(train.n_latents, train.lr_scale) if train.lr is None else float(train.lr) * train.lr_scale
    configs = [TrainConfig(architecture="topk", n_latents=train.n_latents, k=train.k, seed=s,
                           lr=lr, device=train.device) for s in train.seeds]
    data = DataConfig(batch_size=train.batch_size, n_tokens=train.n_tokens, data_seed=train.data_seed,
                      hookpoint="synthetic")
    out_dirs = None
    if cache:
        key_settings = {"spec": asdict(spec), "train": {k: v for k, v in asdict(train).items() if k not in ("seeds", "device")}}
        root = SYNTHETIC_DIR / f"synthetic-{settings_key(key_settings)}"
        out_dirs = [seed_dir(root, s) for s in train.seeds]
    results = train_saes(x, configs, data, out_dirs=out_dirs, heldout=heldout, progress=progress)
    return truth, results, heldout


def recovery_summary(truth: GroundTruth, decoders: Sequence[np.ndarray], cos_threshold: float = 0.9,
                     energy_threshold: float = 0.9) -> dict[str, Any]:
    """Headline numbers across seeds: separated features found, group subspaces found,
    group basis directions found, and cross-seed reproducibility per kind of latent."""
    sep = np.stack([separated_recovery(d, truth) for d in decoders])          # [seeds, n_sep]
    groups = [group_subspace_recovery(d, truth, energy_threshold) for d in decoders]
    sub = np.array([g["subspace_min_cos"] for g in groups])                    # [seeds, n_groups]
    basis = np.stack([g["basis_direction_max_cos"] for g in groups]) if truth.spec.n_groups else np.zeros((len(decoders), 0, 0))
    agree = cross_seed_agreement(decoders, truth, cos_threshold, energy_threshold)
    return {
        "separated_max_cos": sep,
        "separated_recovered_fraction": float((sep > cos_threshold).mean()) if sep.size else float("nan"),
        "separated_recovered_in_all_seeds": float((sep > cos_threshold).all(axis=0).mean()) if sep.size else float("nan"),
        "group_subspace_min_cos": sub,
        "group_subspace_recovered_fraction": float((sub > cos_threshold).mean()) if sub.size else float("nan"),
        "group_latents_per_group": np.array([g["latents_per_group"] for g in groups]),
        "group_basis_max_cos": basis,
        "group_basis_recovered_fraction": float((basis > cos_threshold).mean()) if basis.size else float("nan"),
        "separated_reproduced_across_seeds": agree["separated_reproduced"],
        "group_latents_reproduced_across_seeds": agree["group_reproduced"],
        "separated_best_cos_across_seeds": agree["separated_best_cos"],
        "group_best_cos_across_seeds": agree["group_best_cos"],
    }


__all__ = ["SyntheticSpec", "GroundTruth", "SyntheticTraining", "make_ground_truth", "sample", "separated_recovery",
           "group_energy", "assign_latents", "group_subspace_recovery", "cross_seed_agreement",
           "train_synthetic_family", "recovery_summary", "NO_TRUTH"]
