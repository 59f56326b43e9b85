"""Subspaces spanned by groups of latents, and how reproducible they are across seeds (issue #7, item 4).

The companion study ("Unstable features, reproducible subspaces") argues that latents which
reappear in no other seed are individually non-reproducible, yet the *subspace* they span is
shared across seeds: seed dependence is basis ambiguity inside a common region of activation
space. This module measures that:

- `latent_contributions`: the part of an SAE's reconstruction that a set of latents carries,
  `sum_{l in set} a_l(x) W_dec[l]`, on the same tokens for every seed;
- `top_subspace`: the rank-r principal subspace (uncentred SVD) of such a matrix, or of rows;
- `principal_angle_cosines` / `mean_cos2`: principal angles between two subspaces;
- `captured_variance`: the fraction of a matrix's energy inside a subspace;
- `cross_seed_capture`: for every seed pair (i, j), how much of seed j's unstable contribution
  seed i's rank-r subspace captures, next to j's own rank-r subspace (the ceiling), random
  rank-r subspaces, the activations' own top-r principal components, and seed i's *stable*
  subspace of the same rank (controls for "any dominant subspace of the data would do").

Pure numpy, except `latent_contributions` (torch, runs the SAE on `device`).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..sae.architectures import iter_codes, on_device


# --------------------------------------------------------------------------- basic geometry
def top_subspace(matrix: np.ndarray, rank: int, strict: bool = True) -> np.ndarray:
    """Orthonormal basis `[d, rank]` of the top-`rank` right singular vectors of `matrix [n, d]`.

    Uncentred on purpose: for latent contributions the origin is meaningful (no latent active
    means a zero contribution). If `rank` exceeds the matrix's numerical rank, raises when
    `strict`, else returns only the numerically non-zero directions.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"top_subspace needs a 2-D [n, d] matrix; got shape {m.shape}")
    if not 1 <= rank <= min(m.shape):
        raise ValueError(f"rank {rank} must be in 1..min(n, d) = {min(m.shape)} for a {m.shape} matrix")
    # the d x d Gram matrix is cheaper than an SVD of a tall [n, d] matrix
    gram = m.T @ m
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1][:rank]
    tol = max(evals.max(initial=0.0), 0.0) * 1e-10
    if evals[order[-1]] <= tol:
        if not strict:
            return evecs[:, order[evals[order] > tol]]
        raise ValueError(f"rank {rank} exceeds the numerical rank of the matrix "
                         f"({int((evals > tol).sum())}); choose a smaller rank")
    return evecs[:, order]


def random_subspace(d: int, rank: int, rng: np.random.Generator | int = 0) -> np.ndarray:
    """A uniformly random rank-`rank` subspace of R^d: orthonormal basis `[d, rank]`."""
    if not 1 <= rank <= d:
        raise ValueError(f"rank {rank} must be in 1..d = {d}")
    rng = np.random.default_rng(rng)
    q, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    return q


def _check_basis(q: np.ndarray, what: str) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] > q.shape[0]:
        raise ValueError(f"{what} must be an orthonormal basis [d, r] with r <= d; got shape {q.shape}")
    return q


def principal_angle_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between span(a) and span(b), descending.

    `a [d, r1]` and `b [d, r2]` are orthonormal bases; returns min(r1, r2) values in [0, 1]
    (1 = a shared direction, 0 = orthogonal).
    """
    a, b = _check_basis(a, "a"), _check_basis(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"subspaces live in different spaces: d = {a.shape[0]} vs {b.shape[0]}")
    s = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.clip(s, 0.0, 1.0)


def mean_cos2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared principal-angle cosine: 1 for equal subspaces, r_max/d expected at random."""
    return float(np.mean(principal_angle_cosines(a, b) ** 2))


def random_mean_cos2(d: int, rank_a: int, rank_b: int) -> float:
    """Expected `mean_cos2` of two independent uniformly random subspaces: max(r_a, r_b) / d.

    (E ||A^T B||_F^2 = r_a r_b / d, divided by min(r_a, r_b) angles.)
    """
    return max(rank_a, rank_b) / d


def captured_variance(matrix: np.ndarray, basis: np.ndarray) -> float:
    """Fraction of the (uncentred) energy of `matrix [n, d]` inside span(basis [d, r])."""
    m = np.asarray(matrix, dtype=np.float64)
    q = _check_basis(basis, "basis")
    if m.ndim != 2 or m.shape[1] != q.shape[0]:
        raise ValueError(f"matrix {m.shape} and basis {q.shape} disagree on d")
    total = float(np.einsum("nd,nd->", m, m))
    if total <= 0:
        raise ValueError("the matrix is all zeros: no variance to capture")
    proj = m @ q
    return float(np.einsum("nr,nr->", proj, proj) / total)


# --------------------------------------------------------------------------- SAE contributions
@torch.no_grad()
def latent_contributions(sae, activations: np.ndarray, mask: np.ndarray | None = None, batch_size: int = 4096,
                         device: str | torch.device | None = None) -> np.ndarray:
    """float32 `[N, d_in]`: the reconstruction carried by the latents in `mask` (all if None).

    `sum_{l in mask} a_l(x) W_dec[l]` in the SAE's (input-scaled) space, without `b_dec`.
    Works for TopK SAEs (`encode` gives values, indices) and dense-code SAEs.
    """
    n = sae.n_latents
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    if keep.shape != (n,):
        raise ValueError(f"mask must be a bool vector of length n_latents = {n}; got shape {keep.shape}")
    if activations.ndim != 2 or activations.shape[1] != sae.d_in:
        raise ValueError(f"activations must be [N, {sae.d_in}]; got shape {tuple(activations.shape)}")
    sae = on_device(sae, device)
    keep_t = torch.as_tensor(keep, device=sae.device)
    out = np.empty((activations.shape[0], sae.d_in), np.float32)
    for start, x, code in iter_codes(sae, activations, batch_size):
        out[start:start + len(x)] = sae.decode(code.masked(keep_t), bias=False).float().cpu().numpy()
    return out


def latent_groups(shared_counts: np.ndarray, max_shared_unstable: int, min_shared_stable: int) -> dict[str, np.ndarray]:
    """Bool masks `[n_seeds, n_latents]`: unstable (shared with <= max others) and stable (>= min others)."""
    c = np.asarray(shared_counts)
    if max_shared_unstable >= min_shared_stable:
        raise ValueError(f"max_shared_unstable ({max_shared_unstable}) must be below min_shared_stable "
                         f"({min_shared_stable}) so the groups do not overlap")
    return {"unstable": c <= max_shared_unstable, "stable": c >= min_shared_stable}


# --------------------------------------------------------------------------- cross-seed analysis
def _gram_capture(gram: np.ndarray, basis: np.ndarray) -> float:
    """`captured_variance` from the Gram matrix `M^T M` (cheap for many subspaces)."""
    return float(np.einsum("dr,dr->", gram @ basis, basis) / np.trace(gram))


def _eig_desc(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    evals, evecs = np.linalg.eigh(gram)
    return evals[::-1], evecs[:, ::-1]


def _top_from_eig(evals: np.ndarray, evecs: np.ndarray, rank: int, strict: bool) -> np.ndarray:
    tol = max(evals[0], 0.0) * 1e-10
    if evals[rank - 1] <= tol:
        if strict:
            raise ValueError(f"rank {rank} exceeds the numerical rank of the matrix ({int((evals > tol).sum())}); "
                             f"choose a smaller rank")
        return evecs[:, :int((evals[:rank] > tol).sum())]
    return evecs[:, :rank]


def cross_seed_capture(unstable: Sequence[np.ndarray], ranks: Sequence[int], *, stable: Sequence[np.ndarray] | None = None,
                       data: np.ndarray | None = None, n_random: int = 20, seed: int = 0) -> dict[str, Any]:
    """How well seed i's rank-r unstable subspace captures seed j's unstable contribution.

    `unstable[j]` (and `stable[j]`) are `[N, d]` contributions on the *same* tokens. For every
    rank r and ordered pair i != j: `cross[r][i, j] = captured(U_j, Q_i)` with `Q_i` the top-r
    subspace of `U_i`; `within[r][j] = captured(U_j, Q_j)` (the best any rank-r subspace can do);
    `random[r][j]` the mean over `n_random` random rank-r subspaces; `data_pca[r][j]` uses the
    top-r principal components of the centred `data`; `stable_cross[r][i, j]` uses seed i's
    stable subspace (lower rank if seed i has too few stable latents). Also `cos2[r][i, j]`: mean
    squared principal cosine between unstable subspaces. Works on d x d Gram matrices throughout.
    """
    n = len(unstable)
    if n < 2:
        raise ValueError(f"need at least 2 seeds; got {n}")
    shapes = {u.shape for u in unstable}
    if len(shapes) != 1:
        raise ValueError(f"every seed's contribution must be computed on the same tokens; got shapes {shapes}")
    d = unstable[0].shape[1]
    if not ranks or max(ranks) > d or min(ranks) < 1:
        raise ValueError(f"ranks must be in 1..d = {d}; got {list(ranks)}")
    rng = np.random.default_rng(seed)
    grams = [np.asarray(u, np.float64).T @ np.asarray(u, np.float64) for u in unstable]
    if any(np.trace(g) <= 0 for g in grams):
        raise ValueError("a seed's unstable contribution is all zeros (no unstable latent fired)")
    eigs = [_eig_desc(g) for g in grams]
    stable_eigs = None
    if stable is not None:
        stable_eigs = [_eig_desc(np.asarray(s, np.float64).T @ np.asarray(s, np.float64)) for s in stable]
    pca_all = None
    if data is not None:
        centred = np.asarray(data, np.float64) - np.asarray(data, np.float64).mean(0)
        pca_all = _eig_desc(centred.T @ centred)[1]
    out: dict[str, Any] = {"ranks": list(ranks), "d": d, "n_seeds": n, "cross": {}, "within": {}, "random": {},
                           "data_pca": {}, "stable_cross": {}, "cos2": {}, "cos2_random_expected": {}}
    pairs = list(itertools.permutations(range(n), 2))
    for r in ranks:
        bases = [_top_from_eig(ev, vec, r, strict=True) for ev, vec in eigs]
        cross = np.full((n, n), np.nan)
        cos2 = np.full((n, n), np.nan)
        for i, j in pairs:
            cross[i, j] = _gram_capture(grams[j], bases[i])
            cos2[i, j] = mean_cos2(bases[i], bases[j])
        out["cross"][r] = cross
        out["cos2"][r] = cos2
        out["cos2_random_expected"][r] = random_mean_cos2(d, r, r)
        out["within"][r] = np.array([_gram_capture(g, q) for g, q in zip(grams, bases)])
        rand = [random_subspace(d, r, rng) for _ in range(n_random)]
        out["random"][r] = np.array([np.mean([_gram_capture(g, q) for q in rand]) for g in grams])
        if pca_all is not None:
            out["data_pca"][r] = np.array([_gram_capture(g, pca_all[:, :r]) for g in grams])
        if stable_eigs is not None:
            sb = [_top_from_eig(ev, vec, r, strict=False) for ev, vec in stable_eigs]
            sc = np.full((n, n), np.nan)
            for i, j in pairs:
                sc[i, j] = _gram_capture(grams[j], sb[i])
            out["stable_cross"][r] = sc
    return out


def capture_table(result: dict[str, Any]):
    """One row per rank: mean (and std over pairs / seeds) of every capture measure."""

    def off(m: np.ndarray) -> np.ndarray:
        return m[~np.eye(m.shape[0], dtype=bool)]

    rows = []
    for r in result["ranks"]:
        row: dict[str, Any] = {"rank": r, "rank_fraction": r / result["d"],
                               "within": float(result["within"][r].mean()),
                               "cross_seed": float(off(result["cross"][r]).mean()),
                               "cross_seed_std": float(off(result["cross"][r]).std()),
                               "random": float(result["random"][r].mean())}
        if result["data_pca"]:
            row["data_pca"] = float(result["data_pca"][r].mean())
        if result["stable_cross"]:
            row["stable_subspace"] = float(off(result["stable_cross"][r]).mean())
        row["cross_over_within"] = row["cross_seed"] / row["within"]
        row["mean_cos2"] = float(off(result["cos2"][r]).mean())
        row["mean_cos2_random"] = result["cos2_random_expected"][r]
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["top_subspace", "random_subspace", "principal_angle_cosines", "mean_cos2", "random_mean_cos2",
           "captured_variance", "latent_contributions", "latent_groups", "cross_seed_capture", "capture_table"]
