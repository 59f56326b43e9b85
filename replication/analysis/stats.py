"""Statistics used across the figures, in one place.

- resampling: `bootstrap_ci` (over latents), `hierarchical_bootstrap` (groups, then values),
  `seed_bootstrap` (seeds, hence pairs, then latents: the interval that includes seed variance);
- tests: `permutation_test`, `spearman_with_permutation`;
- separability: `auc` (the one Mann-Whitney AUC), `balanced_accuracy`;
- distributions: `bimodality` (dip test + KDE valley; GMM and Sarle as descriptions);
- curves: `fit_power_law` (``a k^b + c`` vs ``a k^b``).

Pure numpy / scipy; every result is plain JSON-serialisable data.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import rankdata

POWER_LAW_P0 = (0.72, -0.35, 0.0)  # the authors' initial guess

DIP_ALPHA = 0.05

VALLEY_MAX_RATIO = 0.8
"""A density valley counts when it is below this fraction of the lower of the two peaks beside it."""



# --------------------------------------------------------------------------- helpers
def finite_or_none(x: float) -> float | None:
    """x as a float, or None where it is NaN or infinite (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def statistic(stat: str):
    """The numpy reduction a bootstrap summarises: "mean" (a fraction, for booleans) or "median"."""
    if stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean' or 'median', got {stat!r}")
    return np.mean if stat == "mean" else np.median


# --------------------------------------------------------------------------- resampling
def bootstrap_ci(x: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 stat: str = "mean", chunk: int = 64) -> dict[str, Any]:
    """Percentile bootstrap over latents for the mean (a fraction, for booleans) or the
    median of `x`. Returns estimate, low, high and the settings."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty array")
    f = statistic(stat)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        idx = rng.integers(0, x.size, size=(b, x.size))
        boots[s:s + b] = f(x[idx], axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return {"estimate": float(f(x)), "low": float(low), "high": float(high), "stat": stat,
            "ci": ci, "n_boot": n_boot, "seed": seed, "n": int(x.size)}


def hierarchical_bootstrap(groups: Sequence[np.ndarray], n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                           stat: str = "median") -> dict[str, Any]:
    """Two-level percentile bootstrap of the pooled median (or mean) of several groups (seed pairs):
    resample the groups, then the values within each. Seed pairs share seeds and latents within a
    pair are not independent, so resampling pairs as well widens the interval honestly."""
    groups = [np.asarray(g, np.float64).ravel() for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("hierarchical_bootstrap needs non-empty groups")
    f = statistic(stat)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        boots[b] = f(np.concatenate([groups[g][rng.integers(0, groups[g].size, groups[g].size)] for g in pick]))
    a = (1 - ci) / 2
    low, high = np.quantile(boots, [a, 1 - a])
    return {"estimate": float(f(np.concatenate(groups))), "low": float(low), "high": float(high), "stat": stat,
            "ci": ci, "n_boot": n_boot, "n_groups": len(groups), "seed": seed}


def hierarchical_mean(estimates: np.ndarray, draws: np.ndarray, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean over units (base SAEs, one per seed) of a per-unit estimate, with a two-level bootstrap: each
    replicate resamples the units with replacement and takes, for each drawn unit, its own replicate of a
    within-unit bootstrap (`draws [n_units, n_boot]`, e.g. over held-out sequences). The interval therefore
    carries the variance between units, which a within-unit bootstrap alone misses (tests/test_stats.py shows
    its coverage on a null with seed effects). One unit gives the within-unit interval.

    `hierarchical_bootstrap` does the same from raw values; this takes each unit's own replicates instead, so
    the within-unit statistic can be anything the caller bootstraps (a ratio of sums, a paired difference)."""
    estimates, draws = np.asarray(estimates, np.float64), np.asarray(draws, np.float64)
    if estimates.ndim != 1 or draws.ndim != 2 or draws.shape[0] != estimates.shape[0] or estimates.size == 0:
        raise ValueError(f"estimates must be [n_units > 0] and draws [n_units, n_boot]; got {estimates.shape}, {draws.shape}")
    n_units, n_boot = draws.shape
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n_units, size=(n_boot, n_units))                    # [B, n_units] drawn units
    boot = draws[pick, np.arange(n_boot)[:, None]].mean(1)                   # each drawn unit's own replicate
    a = (1 - ci) / 2
    lo, hi = (float(v) for v in np.quantile(boot, [a, 1 - a]))
    return {"estimate": float(estimates.mean()), "ci95_seed": [lo, hi], "per_base": [float(v) for v in estimates],
            "n_bases": int(n_units), "excludes_zero": bool(lo > 0 or hi < 0)}


def seed_bootstrap(values: np.ndarray, pairs: Sequence[tuple[int, int]], n_seeds: int, n_boot: int = 1000,
                   ci: float = 0.95, seed: int = 0, chunk: int = 64, return_draws: bool = False) -> dict[str, Any]:
    """Hierarchical bootstrap of a pair-averaged statistic of a seed family: resample the seeds (hence
    the pairs), then the latents within each pair.

    `values [n_pairs, n_latents]` holds a per-latent value for each unordered seed pair `pairs[k] = (i, j)`
    (e.g. 1 where base latent l of seed i is shared with seed j, or its matched decoder cosine). The
    estimate is the mean over pairs of the per-pair mean. A resample draws `n_seeds` seeds with replacement;
    each pair of distinct drawn seeds counts once per way of picking it (weight m_i * m_j for multiplicities
    m), pairs of a seed with itself are dropped; within each pair the latents are resampled too. The interval
    therefore carries the variance between seeds, which a latent-only bootstrap misses
    (tests/test_stats.py shows its coverage on a null with seed effects). `return_draws` adds the
    replicates (`draws`, an array) for comparisons between families.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[0] != len(pairs) or values.shape[1] == 0:
        raise ValueError(f"values must be [n_pairs={len(pairs)}, n_latents > 0], got {values.shape}")
    if n_seeds < 2:
        raise ValueError(f"a seed bootstrap needs at least 2 seeds, got {n_seeds}")
    first = np.array([min(p) for p in pairs])
    second = np.array([max(p) for p in pairs])
    if (first == second).any() or first.min() < 0 or second.max() >= n_seeds:
        raise ValueError(f"pairs must be distinct seed indices in 0..{n_seeds - 1}")
    rng = np.random.default_rng(seed)
    n_pairs, n_latents = values.shape
    pair_boot = np.empty((n_boot, n_pairs))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        for k in range(n_pairs):
            pair_boot[start:start + b, k] = values[k][rng.integers(0, n_latents, size=(b, n_latents))].mean(1)
    draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = np.stack([np.bincount(d, minlength=n_seeds) for d in draws]).astype(np.float64)
    weights = counts[:, first] * counts[:, second]
    ok = weights.sum(1) > 0                 # every drawn seed the same: no pair (probability n^(1-n))
    boots = (weights[ok] * pair_boot[ok]).sum(1) / weights[ok].sum(1)
    a = (1 - ci) / 2
    low, high = np.quantile(boots, [a, 1 - a])
    out = {"estimate": float(values.mean(1).mean()), "low": float(low), "high": float(high), "ci": ci,
           "n_boot": int(ok.sum()), "n_seeds": int(n_seeds), "n_pairs": int(n_pairs), "seed": seed}
    if return_draws:
        out["draws"] = boots
    return out


# --------------------------------------------------------------------------- tests
def permutation_test(x: np.ndarray, y: np.ndarray, n_perm: int = 1000, seed: int = 0,
                     stat: str = "mean") -> dict[str, Any]:
    """Two-sided permutation test of a difference in mean (or median) between samples x
    and y (e.g. firing frequency of shared vs orphan latents). p = (1 + #extreme) / (1 + n_perm)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples must be non-empty")
    f = {"mean": np.mean, "median": np.median}[stat]
    observed = float(f(x) - f(y))
    pooled = np.concatenate([x, y])
    rng = np.random.default_rng(seed)
    extreme = 0
    for _ in range(n_perm):
        p = rng.permutation(pooled)
        if abs(f(p[:x.size]) - f(p[x.size:])) >= abs(observed) - 1e-12:
            extreme += 1
    return {"observed": observed, "p_value": (1 + extreme) / (1 + n_perm), "n_perm": n_perm,
            "stat": stat, "seed": seed, "n_x": int(x.size), "n_y": int(y.size)}


def _finite_ranks(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return rankdata(x[ok]), rankdata(y[ok])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho of x and y over the pairs where both are finite; NaN where it is undefined (fewer than
    3 pairs, or either side constant)."""
    return _pearson_of_ranks(*_finite_ranks(x, y))


def _pearson_of_ranks(rx: np.ndarray, ry: np.ndarray) -> float:
    """Pearson r of two rank vectors (Spearman rho of what they rank); NaN under 3 pairs or a constant side."""
    if len(rx) < 3 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_with_permutation(x: np.ndarray, y: np.ndarray, n_perm: int = 2000, seed: int = 0) -> dict[str, float]:
    """`spearman(x, y)` and a two-sided permutation p-value (NaNs dropped)."""

    x, y = _finite_ranks(x, y)                      # ranked once: the statistic and every permutation use them
    rho = _pearson_of_ranks(x, y)
    if not np.isfinite(rho):
        return {"rho": float("nan"), "p_value": float("nan"), "n": int(len(x))}
    rng = np.random.default_rng(seed)
    perms = np.array([np.corrcoef(x, rng.permutation(y))[0, 1] for _ in range(n_perm)])
    p = float((np.sum(np.abs(perms) >= abs(rho) - 1e-12) + 1) / (n_perm + 1))
    return {"rho": rho, "p_value": p, "n": int(len(x))}


# --------------------------------------------------------------------------- separability
def auc(x: np.ndarray, y: np.ndarray) -> float:
    """P(a value of x > a value of y) + 0.5 P(tie): the Mann-Whitney AUC (0.5 = no separation)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples must be non-empty")

    ranks = rankdata(np.concatenate([x, y]))
    return float((ranks[:x.size].sum() - x.size * (x.size + 1) / 2) / (x.size * y.size))


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of the true-positive and true-negative rates (0.5 = chance, whatever the class balance)."""
    labels, predicted = np.asarray(labels, bool), np.asarray(predicted, bool)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    if labels.all() or not labels.any():
        raise ValueError("balanced accuracy needs both activating and non-activating contexts")
    return float(0.5 * (predicted[labels].mean() + (~predicted[~labels]).mean()))


# --------------------------------------------------------------------------- bimodality (Figure 1)
def gmm_1d(x: np.ndarray, n_components: int, n_iter: int = 500, seed: int = 0) -> dict[str, Any]:
    """Maximum-likelihood 1-D Gaussian mixture by EM (quantile initialisation, deterministic)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    means = np.quantile(x, np.linspace(0.2, 0.8, n_components)) if n_components > 1 else np.array([x.mean()])
    var = np.full(n_components, max(x.var(), 1e-6))
    weights = np.full(n_components, 1.0 / n_components)
    prev = -np.inf
    for _ in range(n_iter):
        log_p = -0.5 * ((x[:, None] - means) ** 2 / var + np.log(2 * np.pi * var)) + np.log(weights)
        log_norm = np.logaddexp.reduce(log_p, axis=1)
        resp = np.exp(log_p - log_norm[:, None])
        nk = resp.sum(0) + 1e-12
        weights = nk / n
        means = (resp * x[:, None]).sum(0) / nk
        var = np.maximum((resp * (x[:, None] - means) ** 2).sum(0) / nk, 1e-6)
        ll = float(log_norm.sum())
        if abs(ll - prev) < 1e-9 * max(1.0, abs(ll)):
            break
        prev = ll
    n_params = 3 * n_components - 1
    order = np.argsort(means)
    return {"log_likelihood": ll, "bic": n_params * np.log(n) - 2 * ll, "means": means[order].tolist(),
            "stds": np.sqrt(var[order]).tolist(), "weights": weights[order].tolist()}


def kde_modes(x: np.ndarray, grid_size: int = 512) -> dict[str, Any]:
    """Modes and the deepest valley of a Gaussian KDE (Silverman's bandwidth) on a grid over x's range.

    Returns the mode locations (local maxima holding at least 5% of the top peak's height), and for
    the two highest modes the valley between them: `valley_ratio` = min density between them / the
    lower of the two peaks (1 when there is one mode).
    """
    from scipy.stats import gaussian_kde

    x = np.asarray(x, np.float64)
    kde = gaussian_kde(x, bw_method="silverman")
    grid = np.linspace(x.min(), x.max(), grid_size)
    dens = kde(grid)
    inner = (dens[1:-1] > dens[:-2]) & (dens[1:-1] >= dens[2:])
    peaks = np.nonzero(inner)[0] + 1
    for end in (0, grid_size - 1):   # a boundary point can be a mode (mass piled at 0 or 1)
        neighbour = 1 if end == 0 else grid_size - 2
        if dens[end] > dens[neighbour]:
            peaks = np.append(peaks, end)
    peaks = np.sort(peaks[dens[peaks] >= 0.05 * dens.max()])
    out: dict[str, Any] = {"bandwidth": float(kde.factor * x.std(ddof=1)), "modes": grid[peaks].tolist(),
                           "n_modes": int(len(peaks)), "valley_ratio": 1.0, "valley_at": None}
    if len(peaks) >= 2:
        top = np.sort(peaks[np.argsort(dens[peaks])[-2:]])
        between = slice(top[0], top[1] + 1)
        v = top[0] + int(np.argmin(dens[between]))
        out["valley_ratio"] = float(dens[v] / min(dens[top[0]], dens[top[1]]))
        out["valley_at"] = float(grid[v])
    return out


def dip_test(x: np.ndarray) -> dict[str, float]:
    """Hartigan's dip test of unimodality (the `diptest` package; p-value from its tabulated null)."""
    import diptest

    dip, p_value = diptest.diptest(np.asarray(x, np.float64))
    return {"dip": float(dip), "p_value": float(p_value), "alpha": DIP_ALPHA}


def bimodality(x: np.ndarray) -> dict[str, Any]:
    """Evidence that a similarity distribution has two modes (shared vs orphan latents).

    The verdict `bimodal` rests on two checks that say "no" on skewed unimodal samples of the same
    size (beta, gamma, lognormal, uniform; see tests/test_stability.py's calibration): Hartigan's
    dip test rejects unimodality (p < 0.05), and the KDE has a valley between its two highest
    modes below 80% of the lower peak. The 1- vs 2-Gaussian ΔBIC and Sarle's coefficient are kept
    as descriptions only: ΔBIC exceeds 10 for any skewed sample of ~1000 draws, and Sarle's
    coefficient exceeds 5/9 for a uniform one (`bimodal_old_rule` records that old verdict).
    """
    from scipy import stats

    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 4 or x.std() == 0:
        return {"n": n, "bimodal": False, "reason": "too few or constant values"}
    one, two = gmm_1d(x, 1), gmm_1d(x, 2)
    skew = float(stats.skew(x, bias=False))
    kurt = float(stats.kurtosis(x, bias=False))
    coefficient = (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    delta_bic = one["bic"] - two["bic"]
    separated = abs(two["means"][1] - two["means"][0]) > 2 * max(two["stds"]) if len(two["means"]) == 2 else False
    dip = dip_test(x)
    modes = kde_modes(x)
    return {
        "n": n,
        "gmm_1": one,
        "gmm_2": two,
        "delta_bic_1_minus_2": float(delta_bic),
        "sarle_coefficient": float(coefficient),
        "sarle_threshold": 5 / 9,
        "modes_separated": bool(separated),
        "dip_test": dip,
        "kde": modes,
        "bimodal_old_rule": bool(delta_bic > 10 and coefficient > 5 / 9),
        "bimodal": bool(dip["p_value"] < DIP_ALPHA and modes["valley_ratio"] < VALLEY_MAX_RATIO),
    }


# --------------------------------------------------------------------------- power laws (Figure 2)
def power_law(k: np.ndarray, a: float, b: float, c: float = 0.0) -> np.ndarray:
    """``a * k**b + c`` (for drawing fitted curves)."""
    return a * np.power(np.asarray(k, dtype=np.float64), b) + c


def fit_power_law(k: Sequence[float], y: Sequence[float], p0: Sequence[float] = POWER_LAW_P0) -> dict[str, Any]:
    """Fit ``a * k**b + c`` and ``a * k**b`` by least squares (scipy curve_fit, the authors'
    initial guess), and compare them: residual sum of squares, AIC, BIC (Gaussian errors)
    and the nested-model F-test (H0: c = 0). Returns plain JSON-serialisable data."""
    from scipy import stats
    from scipy.optimize import curve_fit

    k = np.asarray(k, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if k.shape != y.shape or k.ndim != 1:
        raise ValueError("k and y must be 1-D arrays of the same length")
    n = len(k)
    if n < 4:
        raise ValueError(f"need at least 4 points to compare a 3- and a 2-parameter model, got {n}")

    def with_offset(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a * np.power(x, b) + c

    def without_offset(x: np.ndarray, a: float, b: float) -> np.ndarray:
        return a * np.power(x, b)

    def fit(f: Callable[..., np.ndarray], guess: Sequence[float], names: Sequence[str]) -> dict[str, Any]:
        try:
            popt, pcov = curve_fit(f, k, y, p0=list(guess), maxfev=20000)
        except (RuntimeError, ValueError) as err:  # no convergence: say so instead of failing the figure
            return {"ok": False, "error": str(err), "params": None, "stderr": None, "rss": None,
                    "n_params": len(names), "aic": None, "bic": None}
        resid = y - f(k, *popt)
        rss = float(np.sum(resid ** 2))
        p = len(popt)
        err = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else np.full(p, np.nan)
        # Gaussian log-likelihood with the MLE variance; guard rss == 0 (perfect fit)
        ll_term = n * math.log(max(rss, 1e-300) / n)
        return {"ok": True, "params": {nm: float(v) for nm, v in zip(names, popt)},
                "stderr": {nm: finite_or_none(e) for nm, e in zip(names, err)},
                "rss": rss, "n_params": p, "aic": ll_term + 2 * p, "bic": ll_term + p * math.log(n)}

    full = fit(with_offset, p0, ("a", "b", "c"))
    reduced = fit(without_offset, p0[:2], ("a", "b"))
    df1, df2 = 1, n - 3
    rss1, rss0 = full["rss"], reduced["rss"]
    if not (full["ok"] and reduced["ok"]):
        return {"with_offset": full, "without_offset": reduced,
                "f_test": {"F": None, "df1": df1, "df2": df2, "p_value": None},
                "delta_aic": None, "delta_bic": None, "n_points": n, "p0": [float(v) for v in p0]}
    if df2 <= 0:
        F, pval = float("nan"), float("nan")
    elif rss1 <= 0:
        F, pval = (float("inf"), 0.0) if rss0 > 0 else (float("nan"), float("nan"))
    else:
        F = max((rss0 - rss1) / df1, 0.0) / (rss1 / df2)
        pval = float(stats.f.sf(F, df1, df2))
    return {"with_offset": full, "without_offset": reduced,
            "f_test": {"F": finite_or_none(F), "df1": df1, "df2": df2, "p_value": finite_or_none(pval)},
            "delta_aic": full["aic"] - reduced["aic"], "delta_bic": full["bic"] - reduced["bic"],
            "n_points": n, "p0": [float(v) for v in p0]}
