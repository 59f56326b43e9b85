"""Per-latent stability over many seeds (companion study: "Unstable features, reproducible subspaces").

For a base SAE and N-1 other seeds, a base latent's **reappearance probability** is the fraction of
the other seeds that hold a partner above the cosine threshold (the study: theta = 0.7). With many
seeds it is a per-latent estimate with a binomial interval (Wilson or Clopper-Pearson), and its
distribution over latents is expected to have a stable mode (p near 1) and an unstable mode (p near
0); latents are called stable when p >= 1 - eps and unstable when p <= eps (the study: eps = 0.05).

Two labellings of "has a partner" are compared: the study's many-to-one maximum cosine and the
paper's one-to-one Hungarian matching (the study reports an IoU of 0.978 between them).

Pure numpy / scipy on top of `stability.FamilyMatching`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from ..analysis.matching import DEFAULT_THRESHOLD, MatchResult

METHODS: tuple[str, ...] = ("maxcos", "hungarian")
WHICH: tuple[str, ...] = ("decoder", "both")
DEFAULT_EPS = 0.05


# --------------------------------------------------------------------------- the many-seed family
def many_seed_spec(base: Any, n_seeds: int, n_latents: int | None = None, k: int | None = None,
                   n_tokens: int | None = None, first_seed: int = 0) -> Any:
    """A `FamilySpec` like `base` (same activations and recipe) with `n_seeds` seeds and optionally
    another size / k / token budget. Intermediate checkpoints are dropped (not needed here).
    Seeds are not part of the training key, so a smaller seed list reuses the same checkpoints."""
    if n_seeds < 2:
        raise ValueError(f"a many-seed family needs at least 2 seeds, got {n_seeds}")
    changes: dict[str, Any] = {"seeds": tuple(range(first_seed, first_seed + int(n_seeds))), "checkpoint_at_tokens": ()}
    if n_latents is not None:
        changes["n_latents"] = int(n_latents)
    if k is not None:
        changes["k"] = int(k)
    if n_tokens is not None:
        changes["n_tokens"] = int(n_tokens)
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- labellings
def partner_mask(result: MatchResult, method: str = "maxcos", which: str = "decoder",
                 threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """bool [n_latents]: base latent has a partner in the other SAE above `threshold` (strict `>`).

    method "maxcos": the row-maximum cosine (many-to-one, the study's labelling);
    "hungarian": the one-to-one matched partner's cosine (the paper's). which "decoder": decoder
    cosine only (the study); "both": decoder and encoder cosines (the paper's `threshold` definition).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if which not in WHICH:
        raise ValueError(f"unknown `which` {which!r}; choose one of {WHICH}")
    dec, enc = ((result.dec_max_cos, result.enc_max_cos) if method == "maxcos" else (result.dec_cos, result.enc_cos))
    t = float(threshold)
    mask = np.asarray(dec, np.float64) > t
    if which == "both":
        mask &= np.asarray(enc, np.float64) > t
    return mask


def reappearance_events(fm: Any, method: str = "maxcos", which: str = "decoder",
                        threshold: float = DEFAULT_THRESHOLD, bases: Sequence[int] | None = None) -> np.ndarray:
    """bool [n_bases, n_seeds - 1, n_latents]: latent l of base b has a partner in its j-th other seed.
    `fm` is a `stability.FamilyMatching` (only base-vs-other matchings are read)."""
    bases = list(range(fm.n_seeds)) if bases is None else [int(b) for b in bases]
    out = np.zeros((len(bases), fm.n_seeds - 1, fm.n_latents), bool)
    for i, b in enumerate(bases):
        others = [j for j in range(fm.n_seeds) if j != b]
        for jj, j in enumerate(others):
            out[i, jj] = partner_mask(fm.result(b, j), method, which, threshold)
    return out


def reappearance_probability(events: np.ndarray) -> np.ndarray:
    """float [..., n_latents]: fraction of the other seeds (axis -2) in which a latent reappears."""
    events = np.asarray(events, bool)
    if events.ndim < 2 or events.shape[-2] < 1:
        raise ValueError(f"events must be [..., n_others, n_latents] with n_others >= 1, got {events.shape}")
    return events.mean(axis=-2)


# --------------------------------------------------------------------------- binomial intervals
def wilson_interval(successes: np.ndarray, n: int | np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion (vectorised): (low, high)."""
    from scipy import stats

    x, n = _check_binomial(successes, n)
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = x / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def clopper_pearson_interval(successes: np.ndarray, n: int | np.ndarray,
                             confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) binomial interval (vectorised): (low, high); conservative."""
    from scipy import stats

    x, n = _check_binomial(successes, n)
    alpha = 1 - confidence
    low = np.where(x > 0, stats.beta.ppf(alpha / 2, x, n - x + 1), 0.0)
    high = np.where(x < n, stats.beta.ppf(1 - alpha / 2, x + 1, n - x), 1.0)
    return np.nan_to_num(low, nan=0.0), np.nan_to_num(high, nan=1.0)


def _check_binomial(successes: np.ndarray, n: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(successes, np.float64)
    n = np.broadcast_to(np.asarray(n, np.float64), x.shape)
    if np.any(n <= 0):
        raise ValueError("binomial intervals need n >= 1 trials")
    if np.any(x < 0) or np.any(x > n) or not np.array_equal(x, np.round(x)):
        raise ValueError("successes must be integers in 0..n")
    return x, n


# --------------------------------------------------------------------------- classes and agreement
def stability_classes(p: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Per latent: "stable" (p >= 1 - eps), "unstable" (p <= eps) or "intermediate"."""
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, "intermediate", dtype=object)
    out[p >= 1 - eps - 1e-12] = "stable"
    out[p <= eps + 1e-12] = "unstable"
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean labellings (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"labellings differ in shape: {a.shape} vs {b.shape}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else float((a & b).sum() / union)


def labelling_agreement(events_a: np.ndarray, events_b: np.ndarray, p_a: np.ndarray, p_b: np.ndarray,
                        eps: float = DEFAULT_EPS) -> dict[str, float]:
    """How far two labellings (e.g. max cosine vs Hungarian) agree: IoU of the reappearance events
    (latent, other seed), IoU of the stable and of the unstable sets, and the mean |p_a - p_b|."""
    ca, cb = stability_classes(p_a, eps), stability_classes(p_b, eps)
    return {
        "iou_events": iou(events_a, events_b),
        "iou_stable": iou(ca == "stable", cb == "stable"),
        "iou_unstable": iou(ca == "unstable", cb == "unstable"),
        "event_agreement": float((np.asarray(events_a) == np.asarray(events_b)).mean()),
        "mean_abs_dp": float(np.abs(np.asarray(p_a) - np.asarray(p_b)).mean()),
    }


# --------------------------------------------------------------------------- two modes
def binomial_mixture(successes: np.ndarray, n: int, n_components: int, n_iter: int = 1000,
                     tol: float = 1e-10) -> dict[str, Any]:
    """Maximum-likelihood mixture of `n_components` binomials Bin(n, p_c) over per-latent counts (EM,
    deterministic quantile start). Returns the component p's and weights (sorted by p), the
    log-likelihood and BIC. Two components = the study's stable and unstable modes."""
    from scipy import stats

    x, _ = _check_binomial(successes, n)
    x = x.ravel()
    if x.size < n_components:
        raise ValueError(f"need at least {n_components} latents to fit {n_components} components")
    probs = np.clip(np.quantile(x / n, np.linspace(0.1, 0.9, n_components)), 0.02, 0.98)
    probs = probs + np.linspace(0, 1e-3, n_components)
    weights = np.full(n_components, 1.0 / n_components)
    prev = -np.inf
    for _ in range(n_iter):
        log_p = stats.binom.logpmf(x[:, None], n, probs[None, :]) + np.log(np.maximum(weights, 1e-300))
        norm = np.logaddexp.reduce(log_p, axis=1)
        resp = np.exp(log_p - norm[:, None])
        nk = resp.sum(0) + 1e-12
        weights = nk / x.size
        probs = np.clip((resp * x[:, None]).sum(0) / (n * nk), 1e-9, 1 - 1e-9)
        ll = float(norm.sum())
        if abs(ll - prev) < tol * max(1.0, abs(ll)):
            break
        prev = ll
    order = np.argsort(probs)
    n_params = 2 * n_components - 1
    return {"n_components": n_components, "p": probs[order].tolist(), "weights": weights[order].tolist(),
            "log_likelihood": ll, "bic": n_params * math.log(x.size) - 2 * ll, "n": int(x.size), "trials": int(n)}


def two_mode_summary(p: np.ndarray, n_others: int, eps: float = DEFAULT_EPS, max_components: int = 3) -> dict[str, Any]:
    """Is the reappearance distribution two-moded? Binomial mixtures with 1..`max_components`
    components (BIC; the best is the smallest), the fraction of latents at each end (p <= eps,
    p >= 1 - eps) and in between, and the histogram of counts 0..n_others."""
    p = np.asarray(p, np.float64).ravel()
    counts = np.round(p * n_others)
    fits = [binomial_mixture(counts, n_others, c) for c in range(1, max_components + 1)]
    best = min(fits, key=lambda f: f["bic"])
    cls = stability_classes(p, eps)
    hist = np.bincount(counts.astype(np.int64), minlength=n_others + 1)
    interior = hist[1:-1]
    return {
        "fits": fits, "best_n_components": best["n_components"],
        "delta_bic_1_minus_2": fits[0]["bic"] - fits[1]["bic"] if len(fits) > 1 else None,
        "fraction_stable": float((cls == "stable").mean()), "fraction_unstable": float((cls == "unstable").mean()),
        "fraction_intermediate": float((cls == "intermediate").mean()),
        "histogram": hist.tolist(),
        # U shape: each end bin holds more latents than the average interior bin
        "u_shaped": bool(interior.size == 0 or (hist[0] > interior.mean() and hist[-1] > interior.mean())),
        "eps": eps, "n_others": int(n_others),
    }


# --------------------------------------------------------------------------- frequency relation
def frequency_relation(p: np.ndarray, frequency: np.ndarray, n_bins: int = 10, eps: float = DEFAULT_EPS) -> dict[str, Any]:
    """Reappearance probability vs firing frequency over live latents: Spearman rho, the mean p per
    frequency decile (equal-count bins of log10 frequency) and median frequency of stable vs
    unstable latents."""
    from scipy import stats

    p = np.asarray(p, np.float64).ravel()
    f = np.asarray(frequency, np.float64).ravel()
    if p.shape != f.shape:
        raise ValueError(f"p and frequency differ in shape: {p.shape} vs {f.shape}")
    live = f > 0
    if live.sum() < 3:
        raise ValueError("need at least 3 live latents to relate stability to firing frequency")
    lp, lf = p[live], np.log10(f[live])
    rho = stats.spearmanr(lf, lp)
    edges = np.unique(np.quantile(lf, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, lf, side="right") - 1, 0, len(edges) - 2)
    bins = [{"log10_freq_low": float(edges[b]), "log10_freq_high": float(edges[b + 1]),
             "n": int((which == b).sum()), "mean_p": float(lp[which == b].mean()) if (which == b).any() else None}
            for b in range(len(edges) - 1)]
    cls = stability_classes(lp, eps)
    med = {c: (float(np.median(f[live][cls == c])) if (cls == c).any() else None) for c in ("stable", "unstable", "intermediate")}
    return {"spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue), "n_live": int(live.sum()),
            "n_dead": int((~live).sum()), "bins": bins, "median_frequency": med}
