"""Seed-stability analyses on top of pairwise matchings (SPEC sections 3-4; paper Fig 2, 3, A1).

- `FamilyMatching`: all N(N-1)/2 pairs of N seeds matched once; b -> a is the inverse.
- `shared_counts` / `kseed_only_in_base`: how many latents exist in the base SAE only
  when k seeds are compared, averaged **exactly** over every base and every (k-1)-subset.
- `offset_evidence`: is there a persistent-orphan offset? (bootstrap over base latents; the fits live in `stats`).
- firing-frequency helpers for Figure 3, a random-direction chance baseline and the threshold
  sweep of Figure A1. Generic statistics (bootstraps, tests, bimodality, power-law fits) are in `stats`.

Pure numpy / scipy / pandas.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..sae.directions import LatentDirections
from .matching import DEFAULT_THRESHOLD, DEFINITIONS, MatchResult, match, shared_masks
from .stats import finite_or_none, fit_power_law, seed_bootstrap


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

    def pw_mcc(self, n_boot: int = 1000, seed: int = 0, return_draws: bool = False) -> dict[str, Any]:
        """Song et al.'s PW-MCC: the mean Hungarian-matched decoder cosine, averaged over seed pairs, with
        the hierarchical seed-level interval (`stats.seed_bootstrap`: seeds, then latents). `return_draws`
        adds the bootstrap replicates (`draws`, an array, not for JSON) for fits and comparisons."""
        pairs = list(itertools.combinations(range(self.n_seeds), 2))
        values = np.stack([np.asarray(self._results[p].dec_cos, np.float64) for p in pairs])
        out = seed_bootstrap(values, pairs, self.n_seeds, n_boot=n_boot, seed=seed, return_draws=return_draws)
        summary = {"estimate": out["estimate"], "ci95_seed": [out["low"], out["high"]], "n_seeds": self.n_seeds,
                   "n_pairs": len(pairs), "n_latents": self.n_latents}
        if return_draws:
            summary["draws"] = out["draws"]
        return summary

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
        "offset": finite_or_none(c_hat), "offset_ci95": c_ci,
        "orphans_none_shared": float(hist[0] / total),
        "orphans_expected_if_independent": float((1 - p_hat) ** (n_seeds - 1)),
        "pairwise_shared_rate": p_hat,
        "excess_orphans": excess_hat, "excess_orphans_ci95": e_ci,
        "n_boot": n_boot, "resampled": "base latents (pooled over bases)",
        "verdict_offset": bool(c_ci[0] > 0 and e_ci[0] > 0),
    }


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


def untrained_pw_mcc(architecture: str, d_in: int, n_latents: int, k: int | None, seeds: Sequence[int],
                     n_boot: int = 1000, seed: int = 0, cache: bool = True,
                     cache_dir: Path | str | None = None) -> dict[str, Any]:
    """PW-MCC of SAEs of this shape at their seeded initialisation (no training): the floor a trained
    family's PW-MCC must be read against (random decoder directions already match at a positive cosine). The
    matchings are cached like a trained family's (keyed on the weights' content hash): every figure of a family
    asks for the same floor, and 36 matchings at 1024 latents take ~10 s (`cache=False`: nothing written)."""
    from ..sae.architectures import build_sae

    saes = [build_sae(architecture, d_in, n_latents, k=k, seed=s) for s in seeds]
    fm = FamilyMatching([sae.latent_directions(name=f"untrained-seed{s}") for sae, s in zip(saes, seeds)], cache=cache,
                        cache_dir=cache_dir, progress=False)
    return fm.pw_mcc(n_boot=n_boot, seed=seed)
