"""Seed-stability analyses on top of pairwise matchings (SPEC sections 3-4; paper Fig 2, 3, A1).

- `FamilyMatching`: all N(N-1)/2 pairs of N seeds matched once; b -> a is the inverse.
- `shared_counts` / `kseed_only_in_base`: how many latents exist in the base SAE only
  when k seeds are compared, averaged **exactly** over every base and every (k-1)-subset.
- `fit_power_law`: ``a k^b + c`` vs ``a k^b``, with uncertainties and an F-test.
- firing-frequency helpers for Figure 3, bootstrap CIs, a random-direction chance baseline,
  a permutation test and the threshold sweep of Figure A1.

Pure numpy / scipy / pandas.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .directions import LatentDirections
from .matching import DEFAULT_THRESHOLD, DEFINITIONS, MatchResult, match, shared_masks

POWER_LAW_P0 = (0.72, -0.35, 0.0)  # the authors' initial guess


# --------------------------------------------------------------------------- families
class FamilyMatching:
    """Pairwise matchings of N SAEs that differ only in their seed.

    Each unordered pair is matched once (cached on disk by `match`); `result(j, i)` is
    `result(i, j).inverse()` -- the bijection inverted, cosines unchanged, the max-cosine
    baseline taken from the column maxima (it is not symmetric).
    """

    def __init__(self, seeds: Sequence[LatentDirections], cache: bool = True, method: str = "auto",
                 cache_dir: Path | str | None = None, progress: bool = True) -> None:
        if len(seeds) < 2:
            raise ValueError(f"a seed family needs at least 2 SAEs, got {len(seeds)}")
        self.seeds = list(seeds)
        self.n_seeds = len(self.seeds)
        self.n_latents = self.seeds[0].n_latents
        pairs = list(itertools.combinations(range(self.n_seeds), 2))
        it: Iterable[tuple[int, int]] = pairs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(pairs, desc="matching seed pairs", unit="pair")
        self._results: dict[tuple[int, int], MatchResult] = {}
        for i, j in it:
            self._results[(i, j)] = match(self.seeds[i], self.seeds[j], cache=cache, method=method,
                                          cache_dir=cache_dir)

    @classmethod
    def from_results(cls, n_seeds: int, results: Mapping[tuple[int, int], MatchResult]) -> "FamilyMatching":
        """Build from ready matchings {(i, j): result} for all i < j (e.g. in tests)."""
        self = cls.__new__(cls)
        self.seeds = []
        self.n_seeds = n_seeds
        self._results = {}
        for i, j in itertools.combinations(range(n_seeds), 2):
            if (i, j) in results:
                self._results[(i, j)] = results[(i, j)]
            elif (j, i) in results:
                self._results[(i, j)] = results[(j, i)].inverse()
            else:
                raise KeyError(f"missing matching for seeds ({i}, {j})")
        self.n_latents = next(iter(self._results.values())).n_latents
        return self

    def result(self, i: int, j: int) -> MatchResult:
        """Matching with seed i as base and seed j as partner."""
        if i == j:
            raise ValueError("a seed is not matched with itself")
        return self._results[(i, j)] if i < j else self._results[(j, i)].inverse()

    def shared(self, definition: str = "threshold", threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """bool [N, N, n_latents]: latent l of base i is shared in seed j (diagonal False)."""
        _check_definition(definition)
        out = np.zeros((self.n_seeds, self.n_seeds, self.n_latents), bool)
        for (i, j), res in self._results.items():
            out[i, j] = shared_masks(res, threshold)[definition]
            out[j, i] = shared_masks(res.inverse(), threshold)[definition]
        return out

    def shared_counts(self, definition: str = "threshold", threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """int [N, n_latents]: with how many of the other N-1 seeds each base latent is shared."""
        return self.shared(definition, threshold).sum(axis=1)

    def mean_similarity(self) -> np.ndarray:
        """float [N, n_latents]: 0.5 * (dec_cos + enc_cos) averaged over the latent's
        matches in the other N-1 seeds (Figure 3's similarity)."""
        return mean_match_similarity([[self.result(i, j) for j in range(self.n_seeds) if j != i]
                                      for i in range(self.n_seeds)])

    def kseed_curve(self, definition: str = "threshold", threshold: float = DEFAULT_THRESHOLD,
                    ks: Sequence[int] | None = None) -> dict[int, float]:
        """Exact Figure-2 curve: fraction of latents only in the base SAE for k seeds."""
        return kseed_only_in_base(self.shared_counts(definition, threshold), self.n_seeds, ks)

    def pair_table(self, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
        """One row per ordered pair (base, other): shared fraction per definition."""
        rows = []
        for i in range(self.n_seeds):
            for j in range(self.n_seeds):
                if i != j:
                    m = shared_masks(self.result(i, j), threshold)
                    rows.append({"base": i, "other": j, **{k: float(v.mean()) for k, v in m.items()}})
        return pd.DataFrame(rows)


def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown definition {definition!r}; choose one of {DEFINITIONS}")


# --------------------------------------------------------------------------- k seeds (Fig 2)
def kseed_only_in_base(counts: np.ndarray, n_seeds: int, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Fraction of latents found only in the base SAE when k of the `n_seeds` seeds are
    compared, averaged over every base and every (k-1)-subset of the other seeds.

    `counts[b, l]` = number of the other N-1 seeds base b's latent l is shared with. A
    latent shared with s of them is orphan for a uniformly random (k-1)-subset with
    probability C(N-1-s, k-1) / C(N-1, k-1); the average is computed in exact integers.
    Default ks = 2..N.
    """
    counts = np.asarray(counts)
    if counts.size == 0:
        raise ValueError("empty counts")
    if not np.issubdtype(counts.dtype, np.integer):
        if not np.array_equal(counts, np.round(counts)):
            raise ValueError("counts must be integers (numbers of other seeds)")
        counts = counts.astype(np.int64)
    if counts.min() < 0 or counts.max() > n_seeds - 1:
        raise ValueError(f"counts must lie in 0..{n_seeds - 1} (other seeds), got {counts.min()}..{counts.max()}")
    ks = list(range(2, n_seeds + 1)) if ks is None else list(ks)
    hist = np.bincount(counts.ravel().astype(np.int64), minlength=n_seeds)
    total = int(counts.size)
    out: dict[int, float] = {}
    for k in ks:
        if not 1 <= k <= n_seeds:
            raise ValueError(f"k must be in 1..{n_seeds}, got {k}")
        num = sum(int(h) * math.comb(n_seeds - 1 - s, k - 1) for s, h in enumerate(hist))
        out[int(k)] = float(Fraction(num, total * math.comb(n_seeds - 1, k - 1)))
    return out


def kseed_only_in_base_bruteforce(shared: np.ndarray, ks: Sequence[int] | None = None) -> dict[int, float]:
    """The paper's literal procedure: for every combination of k seeds and every base in it,
    the fraction of base latents shared with none of the other k-1; averaged over all
    k * C(N, k) experiments. `shared[b, j, l]`: latent l of base b shared in seed j."""
    shared = np.asarray(shared, bool)
    n_seeds = shared.shape[0]
    ks = list(range(2, n_seeds + 1)) if ks is None else list(ks)
    out: dict[int, float] = {}
    for k in ks:
        fracs = []
        for combo in itertools.combinations(range(n_seeds), k):
            for base in combo:
                others = [j for j in combo if j != base]
                orphan = ~shared[base, others].any(axis=0) if others else np.ones(shared.shape[2], bool)
                fracs.append(orphan.mean())
        out[int(k)] = float(np.mean(fracs))
    return out


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


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
                "stderr": {nm: _json_float(e) for nm, e in zip(names, err)},
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
            "f_test": {"F": _json_float(F), "df1": df1, "df2": df2, "p_value": _json_float(pval)},
            "delta_aic": full["aic"] - reduced["aic"], "delta_bic": full["bic"] - reduced["bic"],
            "n_points": n, "p0": [float(v) for v in p0]}


def _curve_from_hist(hist: np.ndarray, n_seeds: int, ks: Sequence[int]) -> np.ndarray:
    """`kseed_only_in_base` from a histogram of shared-with counts (float64; for resampling)."""
    s = np.arange(n_seeds)
    total = hist.sum()
    return np.array([sum(hist[i] * math.comb(n_seeds - 1 - i, k - 1) for i in s) / (total * math.comb(n_seeds - 1, k - 1))
                     for k in ks])


def offset_evidence(counts: np.ndarray, n_seeds: int, n_boot: int = 1000, seed: int = 0,
                    ci: float = 0.95) -> dict[str, Any]:
    """Is there a floor of persistent orphans (the offset c of ``a k^b + c`` in Figure 2)?

    The F-test of `fit_power_law` is not diagnostic: the curve's points are exact, smooth and
    correlated, so it rejects c = 0 even for a family whose latents are shared independently at
    random. Two quantities that can say "no" instead, each with a bootstrap interval over base
    latents (the curve and the fit recomputed per resample, drawn from the histogram of counts):

    - `offset_ci95`: the fitted offset's interval;
    - `excess_orphans`: the fraction of base latents shared with none of the other N-1 seeds,
      minus ``(1 - p)^(N-1)``, what independent sharing at the mean pairwise rate p would leave.

    `offset` (the verdict) is True when both intervals lie above 0.
    """
    counts = np.asarray(counts).astype(np.int64)
    if n_seeds < 5:
        raise ValueError(f"an offset needs at least 4 curve points (5 seeds); got {n_seeds} seeds")
    ks = list(range(2, n_seeds + 1))
    hist = np.bincount(counts.ravel(), minlength=n_seeds).astype(np.float64)
    total = int(hist.sum())

    def stats_of(h: np.ndarray) -> tuple[float, float]:
        curve = _curve_from_hist(h, n_seeds, ks)
        fit = fit_power_law(ks, curve)["with_offset"]
        c = fit["params"]["c"] if fit["ok"] else float("nan")
        p = float((h * np.arange(n_seeds)).sum() / (h.sum() * (n_seeds - 1)))
        return c, float(curve[-1] - (1 - p) ** (n_seeds - 1))

    c_hat, excess_hat = stats_of(hist)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(total, hist / total, size=n_boot).astype(np.float64)
    boot = np.array([stats_of(h) for h in draws])
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    c_ci = [float(np.nanpercentile(boot[:, 0], lo)), float(np.nanpercentile(boot[:, 0], hi))]
    e_ci = [float(np.nanpercentile(boot[:, 1], lo)), float(np.nanpercentile(boot[:, 1], hi))]
    p_hat = float((hist * np.arange(n_seeds)).sum() / (total * (n_seeds - 1)))
    return {
        "offset": _json_float(c_hat), "offset_ci95": c_ci,
        "orphans_none_shared": float(hist[0] / total),
        "orphans_expected_if_independent": float((1 - p_hat) ** (n_seeds - 1)),
        "pairwise_shared_rate": p_hat,
        "excess_orphans": excess_hat, "excess_orphans_ci95": e_ci,
        "n_boot": n_boot, "resampled": "base latents (pooled over bases)",
        "verdict_offset": bool(c_ci[0] > 0 and e_ci[0] > 0),
    }


def power_law(k: np.ndarray, a: float, b: float, c: float = 0.0) -> np.ndarray:
    """``a * k**b + c`` (for drawing fitted curves)."""
    return a * np.power(np.asarray(k, dtype=np.float64), b) + c


# --------------------------------------------------------------------------- firing frequency (Fig 3)
def firing_frequency(firing_counts: np.ndarray, n_tokens: int) -> np.ndarray:
    """Fraction of tokens on which each latent was among the top-k active."""
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    return np.asarray(firing_counts, dtype=np.float64) / float(n_tokens)


def live_mask(firing_counts: np.ndarray) -> np.ndarray:
    """True where a latent fired at least once over the token budget."""
    return np.asarray(firing_counts) > 0


def dead_mask(firing_counts: np.ndarray) -> np.ndarray:
    """True where a latent never fired over the token budget (SPEC: dead latent)."""
    return np.asarray(firing_counts) == 0


def mean_match_similarity(results_per_base: Sequence[Sequence[MatchResult]]) -> np.ndarray:
    """[N_bases, n_latents]: per latent, 0.5 * (dec_cos + enc_cos) averaged over the given
    matchings of each base (all with that base as rows)."""
    out = []
    for results in results_per_base:
        if not results:
            raise ValueError("each base needs at least one matching")
        sims = np.stack([0.5 * (r.dec_cos.astype(np.float64) + r.enc_cos) for r in results])
        out.append(sims.mean(axis=0))
    return np.stack(out)


def frequency_similarity_table(firing_counts: np.ndarray, n_tokens: int, similarity: np.ndarray,
                               shared_counts: np.ndarray) -> pd.DataFrame:
    """Long table for Figure 3, one row per (seed, latent): firing count and frequency
    (count / n_tokens), log10 frequency (NaN when dead), similarity, number of other seeds
    the latent is shared with, and live flag. 1-D inputs mean a single seed."""
    fc = np.atleast_2d(np.asarray(firing_counts))
    sim = np.atleast_2d(np.asarray(similarity, dtype=np.float64))
    sc = np.atleast_2d(np.asarray(shared_counts))
    if not (fc.shape == sim.shape == sc.shape):
        raise ValueError(f"shape mismatch: firing {fc.shape}, similarity {sim.shape}, shared {sc.shape}")
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    freq = fc / float(n_tokens)
    with np.errstate(divide="ignore"):
        logf = np.where(fc > 0, np.log10(np.where(fc > 0, freq, 1.0)), np.nan)
    n_seed, n_lat = fc.shape
    return pd.DataFrame({
        "seed": np.repeat(np.arange(n_seed), n_lat), "latent": np.tile(np.arange(n_lat), n_seed),
        "firing_count": fc.ravel(), "frequency": freq.ravel(), "log10_frequency": logf.ravel(),
        "similarity": sim.ravel(), "shared_with": sc.ravel(), "live": (fc > 0).ravel(),
    })


def stacked_histogram(values: np.ndarray, groups: np.ndarray, bins: int | np.ndarray = 50,
                      group_values: Sequence[int] | None = None) -> pd.DataFrame:
    """Counts per (bin, group) for stacked histograms: index = bin left edge, one column per
    group (e.g. shared_with = 0..8). NaN values are dropped."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    ok = np.isfinite(values)
    values, groups = values[ok], groups[ok]
    edges = np.histogram_bin_edges(values, bins=bins)
    gv = sorted(np.unique(groups).tolist()) if group_values is None else list(group_values)
    data = {g: np.histogram(values[groups == g], bins=edges)[0] for g in gv}
    df = pd.DataFrame(data, index=pd.Index(edges[:-1], name="bin_left"))
    df.attrs["edges"] = edges
    return df


# --------------------------------------------------------------------------- uncertainty
def statistic(stat: str):
    """The numpy reduction a bootstrap summarises: "mean" (a fraction, for booleans) or "median"."""
    if stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean' or 'median', got {stat!r}")
    return np.mean if stat == "mean" else np.median


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


def random_directions_like(dirs: LatentDirections, seed: int = 0) -> LatentDirections:
    """Isotropic random unit directions with the shape of `dirs` (encoder and decoder drawn
    independently): the chance level of matching two unrelated SAEs of that size."""
    rng = np.random.default_rng(seed)
    shape = (dirs.n_latents, dirs.d_in)
    enc = rng.standard_normal(shape).astype(np.float32)
    dec = rng.standard_normal(shape).astype(np.float32)
    enc /= np.linalg.norm(enc, axis=1, keepdims=True)
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    return LatentDirections(enc, dec, name=f"random-like-{dirs.name}-seed{seed}", meta={"random": True, "seed": seed})


def chance_shared_fractions(dirs: LatentDirections, threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                            method: str = "auto") -> dict[str, float]:
    """Shared fraction per definition when two random direction sets shaped like `dirs`
    are matched (not cached)."""
    a = random_directions_like(dirs, seed=2 * seed)
    b = random_directions_like(dirs, seed=2 * seed + 1)
    res = match(a, b, cache=False, method=method)
    return {k: float(v.mean()) for k, v in shared_masks(res, threshold).items()}


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


# --------------------------------------------------------------------------- threshold sweep (Fig A1)
def threshold_sweep(results: "MatchResult | Sequence[MatchResult]",
                    thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Shared fraction per definition (threshold, agree, decoder, maxcos) at every threshold
    (default ``numpy.linspace(0, 1, 50)``), one row per (pair, threshold)."""
    if isinstance(results, MatchResult):
        results = [results]
    thresholds = np.linspace(0, 1, 50) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    frames = []
    for pi, r in enumerate(results):
        dmin = np.minimum(r.dec_cos, r.enc_cos).astype(np.float64)
        agree = r.dec_partner == r.enc_partner
        mmin = np.minimum(r.dec_max_cos, r.enc_max_cos).astype(np.float64)
        dec = r.dec_cos.astype(np.float64)
        t = thresholds[:, None]
        frames.append(pd.DataFrame({
            "pair": pi, "a": r.a_name, "b": r.b_name, "threshold": thresholds,
            "shared_threshold": (dmin[None] > t).mean(axis=1),
            "shared_agree": ((dmin[None] > t) & agree[None]).mean(axis=1),
            "shared_decoder": (dec[None] > t).mean(axis=1),
            "shared_maxcos": (mmin[None] > t).mean(axis=1),
        }))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- bimodality (Figure 1)
def _gmm_1d(x: np.ndarray, n_components: int, n_iter: int = 500, seed: int = 0) -> dict[str, Any]:
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


DIP_ALPHA = 0.05
VALLEY_MAX_RATIO = 0.8
"""A density valley counts when it is below this fraction of the lower of the two peaks beside it."""


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
    one, two = _gmm_1d(x, 1), _gmm_1d(x, 2)
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
