"""Companion claims re-read on better-trained families (issue #17, item 5).

Three verdicts of the companion studies were first read on the core family, whose SAEs are far from
converged: "almost no latents are stable at cosine 0.9" (the GPT-2 report, notebook 11), "unstable latents
fire less" (notebook 09 / Figure 3) and "per-latent stability separates a real model from a random one"
(the dead-salmon control, notebook 12). Here each is measured on the separate-schedule budget families of
notebook 16 (the same SAEs, loaded), at every budget, with seed-level intervals: seeds are resampled, then
latents, so the interval carries the variance between seeds.

- `stable_fraction`: share of Hungarian-matched decoder cosines >= `at`, averaged over seed pairs
  (`stats.seed_bootstrap`).
- `frequency_relation`: per seed, the Spearman correlation of a latent's held-out firing frequency with the
  number of other seeds it is shared with (> 0: stable latents fire more, i.e. unstable ones fire less);
  the mean over seeds with a two-level interval (`stats.hierarchical_mean`).
- `latent_auc`: per seed, the AUC of per-latent stability (shared count / other seeds), real-model family
  vs its random-model twin at the same budget; mean over seeds, two-level interval.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from .. import paths
from ..analysis.matching import DEFAULT_THRESHOLD
from ..analysis.stability import firing_frequency
from ..analysis.stats import auc, hierarchical_mean, seed_bootstrap, spearman

AUC_MARGIN = 0.1
"""Per-latent separation counts when the AUC's interval lies beyond 0.5 +/- this (notebook 12's criterion)."""


BUDGET_KEYS = ("budgets", "budget_seeds")
"""Notebook 16's settings that pick the budget families read here (its params file is their one home)."""


def budget_settings(profile: str, **overrides: Any) -> dict[str, Any]:
    """Notebook 16's `BUDGET_KEYS` for `profile`, with any non-None value in `overrides` taking precedence:
    the families measured here are notebook 16's, loaded, so both must name the same budgets and seeds."""
    return paths.borrowed_settings("16_convergence", profile, BUDGET_KEYS, overrides, what="budget")


def stable_fraction(fm: Any, at: float = 0.9, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Share of latents whose Hungarian-matched decoder cosine is >= `at`, mean over seed pairs, with the
    seed-level interval. `fm` is a `stability.FamilyMatching` (at least 2 seeds)."""
    pairs = list(itertools.combinations(range(fm.n_seeds), 2))
    values = np.stack([np.asarray(fm.result(i, j).dec_cos, np.float64) >= at for i, j in pairs]).astype(np.float64)
    out = seed_bootstrap(values, pairs, fm.n_seeds, n_boot=n_boot, seed=seed)
    return {"at": at, "estimate": out["estimate"], "ci95_seed": [out["low"], out["high"]],
            "per_pair": [float(v) for v in values.mean(1)], "n_seeds": fm.n_seeds}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """`stats.spearman`, with 0 (no relation) where it is undefined: a bootstrap replicate of a seed whose
    resampled latents all share one value must not turn the seed-level mean into NaN."""
    rho = spearman(x, y)
    return rho if np.isfinite(rho) else 0.0


def _per_unit(statistic, samples: Sequence[tuple[np.ndarray, ...]], n_boot: int, seed: int,
              paired: bool = True) -> dict[str, Any]:
    """`statistic(*sample)` per unit (seed) and its mean over units with `stats.hierarchical_mean`: the
    within-unit replicates resample the unit's latents, with the same indices in each of its arrays
    (`paired`: values of the same latents) or each array on its own (two families' latents)."""
    rng = np.random.default_rng(seed)
    estimates = np.array([statistic(*s) for s in samples])
    draws = np.empty((len(samples), n_boot))
    for u, s in enumerate(samples):
        for b in range(n_boot):
            if paired:
                pick = rng.integers(0, len(s[0]), len(s[0]))
                draws[u, b] = statistic(*(a[pick] for a in s))
            else:
                draws[u, b] = statistic(*(a[rng.integers(0, len(a), len(a))] for a in s))
    return hierarchical_mean(estimates, draws, seed=seed)


def frequency_relation(family: Any, threshold: float = DEFAULT_THRESHOLD, definition: str = "threshold",
                       n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Does a latent's firing frequency rise or fall with its stability? Per seed: Spearman(held-out firing
    frequency, number of other seeds sharing the latent); mean over seeds with a seed-level interval. Also
    the median frequency of latents shared with no other seed and with all of them (pooled over seeds)."""
    counts = family.matching.shared_counts(definition, threshold)           # [N, L]
    freq = firing_frequency(family.firing, family.n_heldout)                # [N, L]
    rho = _per_unit(_spearman, [(freq[i], counts[i].astype(np.float64)) for i in range(len(counts))], n_boot, seed)
    n_other = counts.shape[0] - 1
    none, every = freq[counts == 0], freq[counts == n_other]
    return {"spearman": rho,
            "median_frequency": {"shared_with_none": float(np.median(none)) if none.size else None,
                                 "shared_with_all": float(np.median(every)) if every.size else None},
            "fraction_shared_with_none": float((counts == 0).mean()),
            "fraction_shared_with_all": float((counts == n_other).mean()),
            "definition": definition, "threshold": threshold}


def latent_auc(real: Any, random: Any, threshold: float = DEFAULT_THRESHOLD, definition: str = "threshold",
               n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """AUC of per-latent stability, real-model family vs random-model family (> 0.5: real latents are the
    more stable), seed by seed (seed i of each), mean over seeds with a seed-level interval."""
    if real.matching.n_seeds != random.matching.n_seeds:
        raise ValueError(f"the real and random families need the same number of seeds, got "
                         f"{real.matching.n_seeds} and {random.matching.n_seeds}")
    n_other = real.matching.n_seeds - 1
    a = real.matching.shared_counts(definition, threshold) / n_other
    b = random.matching.shared_counts(definition, threshold) / n_other
    # one unit = one seed; its latents of both families are resampled independently
    out = _per_unit(auc, [(a[i], b[i]) for i in range(len(a))], n_boot, seed, paired=False)
    lo, hi = out["ci95_seed"]
    out["separates"] = ("yes" if lo > 0.5 + AUC_MARGIN or hi < 0.5 - AUC_MARGIN else
                        "no" if 0.5 - AUC_MARGIN < lo and hi < 0.5 + AUC_MARGIN else "not resolved")
    return out


def companion_point(family: Any, random_family: Any | None = None, threshold: float = DEFAULT_THRESHOLD,
                    stable_at: float = 0.9, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """The three companion statistics of one budget family (the AUC only where its random twin is given)."""
    budget = int(family.spec.n_tokens)
    out = {"budget": budget, "n_latents": int(family.spec.n_latents), "n_seeds": int(family.matching.n_seeds),
           "dead_fraction": float((family.firing == 0).mean()),
           "stable_fraction": stable_fraction(family.matching, stable_at, n_boot, seed),
           "frequency_relation": frequency_relation(family, threshold, n_boot=n_boot, seed=seed)}
    if random_family is not None:
        out["random_model_auc"] = latent_auc(family, random_family, threshold, n_boot=n_boot, seed=seed)
    return out


def _sign(ci: Sequence[float]) -> int:
    return 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0


def verdict_rows(points: Sequence[dict[str, Any]], almost_none: float = 0.05) -> list[dict[str, Any]]:
    """One "does it hold" row per claim and budget, read off the seed-level intervals only."""
    rows = []
    for p in points:
        b = f"{p['budget']:,} tokens"
        s = p["stable_fraction"]
        lo, hi = s["ci95_seed"]
        rows.append({"claim": f"almost no latents stable at {s['at']} ({b})", "paper": f"~0% (< {almost_none:.0%})",
                     "ours": f"{s['estimate']:.3f} [{lo:.3f}, {hi:.3f}]",
                     "holds": "yes" if hi < almost_none else "no" if lo >= almost_none else "not resolved"})
        r = p["frequency_relation"]["spearman"]
        sign = _sign(r["ci95_seed"])
        rows.append({"claim": f"unstable latents fire less ({b})", "paper": "Spearman(frequency, stability) > 0",
                     "ours": f"Spearman {r['estimate']:+.3f} [{r['ci95_seed'][0]:+.3f}, {r['ci95_seed'][1]:+.3f}]",
                     "holds": {1: "yes", -1: "no: they fire more", 0: "not resolved"}[sign]})
        if "random_model_auc" in p:
            a = p["random_model_auc"]
            rows.append({"claim": f"per-latent stability separates the real from the random model ({b})",
                         "paper": f"AUC away from 0.5 (beyond +/- {AUC_MARGIN})",
                         "ours": f"AUC {a['estimate']:.3f} [{a['ci95_seed'][0]:.3f}, {a['ci95_seed'][1]:.3f}]",
                         "holds": a["separates"]})
    return rows


__all__ = ["AUC_MARGIN", "BUDGET_KEYS", "budget_settings", "stable_fraction",
           "frequency_relation", "latent_auc", "companion_point", "verdict_rows"]
