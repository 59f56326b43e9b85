"""Convergence of seed overlap with the training budget (notebook 16).

Each budget is its own family of runs with a full learning-rate schedule (warm-up, linear decay to
zero) ending at that budget: unlike intermediate checkpoints of one run, no point is taken before
its annealing. Per budget we record held-out FVU, L0, dead fraction and the 2-seed shared fraction
under every definition with its seed-level interval (seeds, then latents), plus PW-MCC. A
saturating curve ``plateau - amplitude * t**(-rate)`` (t in millions of tokens) is fitted to each
statistic, and the plateau's interval comes from refitting it on seed-level bootstrap replicates
(each budget is an independent set of runs, so their replicates are drawn independently).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..analysis.matching import DEFINITIONS
from .ablations import Overlap, family_overlap

#: Statistics that get a fitted plateau: the shared fraction under each definition, PW-MCC and FVU.
STATISTICS: tuple[str, ...] = (*DEFINITIONS, "pw_mcc", "fvu")


def budget_specs(base: Any, sizes: Sequence[int], budgets: Sequence[int], seeds: Sequence[int]) -> dict[tuple[int, int], Any]:
    """The FamilySpec of every (n_latents, budget): the base family with its own full schedule per budget.

    No intermediate checkpoints: a family's point is its final, annealed SAE. Families of equal budget
    share a batch stream, so `experiments.seed_families` trains them in one pass.
    """
    if len(seeds) < 2:
        raise ValueError(f"a budget point needs at least 2 seeds (one pair), got {list(seeds)}")
    bad = [b for b in budgets if int(b) <= 0]
    if bad:
        raise ValueError(f"budgets must be positive token counts, got {bad}")
    return {(int(n), int(b)): dataclasses.replace(base, n_latents=int(n), n_tokens=int(b), seeds=tuple(seeds),
                                                  checkpoint_at_tokens=())
            for n in sizes for b in sorted(budgets)}


@dataclass
class BudgetPoint:
    """One (n_latents, budget) family: its overlap and its training metrics (held-out)."""

    n_latents: int
    budget: int
    passes: float                      # budget / cached training tokens (epochs over the cache)
    overlap: Overlap
    fvu: np.ndarray                    # held-out FVU per seed
    l0: np.ndarray
    dead_fraction: np.ndarray
    fvu_draws: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    pw_mcc_untrained: dict[str, Any] | None = None   # PW-MCC's floor: untrained SAEs of this shape and seeds

    def value(self, statistic: str) -> float:
        if statistic == "fvu":
            return float(self.fvu.mean())
        if statistic == "pw_mcc":
            return float(self.overlap.seed_level["pw_mcc"]["estimate"])
        return self.overlap.mean(statistic)

    def draws(self, statistic: str) -> np.ndarray:
        """Seed-level bootstrap replicates of the statistic (FVU: resampling seeds)."""
        if statistic == "fvu":
            return self.fvu_draws
        return np.asarray(self.overlap.seed_level[statistic]["draws"])

    def summary(self) -> dict[str, Any]:
        out = self.overlap.summary()
        out.update({"n_latents": self.n_latents, "budget": self.budget, "schedule_tokens": self.budget,
               "passes_over_cache": self.passes,
               "fvu": {"mean": float(self.fvu.mean()), "per_seed": [float(x) for x in self.fvu],
                       "ci95_seed": [float(x) for x in np.quantile(self.fvu_draws, [0.025, 0.975])]},
               "l0": float(self.l0.mean()), "dead_fraction": float(self.dead_fraction.mean())})
        if self.pw_mcc_untrained is not None:
            out["pw_mcc_untrained"] = self.pw_mcc_untrained
        return out


def budget_point(family: Any, n_boot: int = 500, threshold: float = 0.7, seed: int = 0) -> BudgetPoint:
    """Summarise a trained family (`experiments.SeedFamily`) as one budget point."""
    from ..analysis.stability import untrained_pw_mcc

    table = family.training_table()
    fvu = table.fvu.to_numpy(np.float64)
    rng = np.random.default_rng(seed + 7)
    fvu_draws = fvu[rng.integers(0, len(fvu), size=(n_boot, len(fvu)))].mean(1)
    overlap = family_overlap(family.directions, threshold=threshold, n_boot=n_boot, seed=seed)
    spec = family.spec
    floor = untrained_pw_mcc(spec.architecture, family.cache.d_model, spec.n_latents, spec.k, spec.seeds, n_boot=n_boot)
    return BudgetPoint(n_latents=spec.n_latents, budget=int(spec.n_tokens), passes=spec.n_tokens / spec.n_train_tokens,
                       overlap=overlap, fvu=fvu, l0=table.l0.to_numpy(np.float64),
                       dead_fraction=table.dead_fraction.to_numpy(np.float64), fvu_draws=fvu_draws,
                       pw_mcc_untrained={"estimate": floor["estimate"], "ci95_seed": floor["ci95_seed"]})


# ------------------------------------------------------------------------------- saturating fit
def saturating(t: np.ndarray, plateau: float, amplitude: float, rate: float) -> np.ndarray:
    """``plateau - amplitude * t**(-rate)``: approaches `plateau` as the budget `t` grows (rate > 0).
    A rising statistic (shared fraction) has amplitude > 0, a falling one (FVU) amplitude < 0."""
    return plateau - amplitude * np.power(np.asarray(t, np.float64), -rate)


RATE_BOUNDS = (0.05, 4.0)
"""The fitted rate's range: a rate at its lower end means the curve is still straight on a log axis (no
sign of saturating), so its plateau is not identified."""


def _fit(t: np.ndarray, y: np.ndarray, plateau_bounds: tuple[float, float]) -> tuple[float, float, float] | None:
    from scipy.optimize import curve_fit

    span = float(y.max() - y.min()) or 1e-3
    rising = y[-1] >= y[0]
    lo, hi = plateau_bounds
    start = float(np.clip(y[-1] + (0.5 if rising else -0.5) * span, lo + 1e-6, hi - 1e-6))
    guess = (start, (1 if rising else -1) * span, 0.5)
    try:
        popt, _ = curve_fit(saturating, t, y, p0=guess, maxfev=20000,
                            bounds=([lo, -np.inf, RATE_BOUNDS[0]], [hi, np.inf, RATE_BOUNDS[1]]))
    except (RuntimeError, ValueError):
        return None
    return float(popt[0]), float(popt[1]), float(popt[2])


def _identified(fit: tuple[float, float, float], plateau_bounds: tuple[float, float]) -> bool:
    """A plateau is identified when neither the plateau nor the rate sits on its bound."""
    plateau, _, rate = fit
    lo, hi = plateau_bounds
    span = (hi - lo) if np.isfinite(hi - lo) else 1.0
    return bool(rate > RATE_BOUNDS[0] * 1.05 and plateau > lo + 1e-3 * span and plateau < hi - 1e-3 * span)


def fit_plateau(budgets: Sequence[int], estimates: Sequence[float], draws: Sequence[np.ndarray] | None = None,
                unit: float = 1e6, ci: float = 0.95,
                plateau_bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict[str, Any]:
    """Fit `saturating` to one statistic against budget, and bootstrap the plateau.

    `draws[i]` are seed-level replicates at budget i (independent runs, so drawn independently); the
    curve is refitted on each joint replicate. Returns the fit, the plateau interval, and per budget the
    gap to the plateau (plateau - value). A fraction has `plateau_bounds` (0, 1). `identified` is False when
    the best fit puts the plateau or the rate on its bound: the curve shows no sign of saturating yet, and
    the last value is only a lower bound on the plateau (the interval is then not reported).
    Needs at least 4 budgets (3 parameters).
    """
    t = np.asarray(budgets, np.float64) / unit
    y = np.asarray(estimates, np.float64)
    if t.ndim != 1 or t.shape != y.shape:
        raise ValueError("budgets and estimates must be 1-D and of equal length")
    if len(t) < 4:
        raise ValueError(f"a 3-parameter saturating fit needs at least 4 budgets, got {len(t)}")
    if np.any(np.diff(t) <= 0):
        raise ValueError("budgets must be strictly increasing")
    best = _fit(t, y, plateau_bounds)
    out: dict[str, Any] = {"model": "plateau - amplitude * (tokens / 1e6) ** -rate", "ok": best is not None,
                           "budgets": [int(b) for b in budgets], "estimates": [float(v) for v in y],
                           "plateau_bounds": [float(b) for b in plateau_bounds]}
    if best is None:
        out["identified"] = False
        return out
    out["identified"] = _identified(best, plateau_bounds)
    plateau, amplitude, rate = best
    grid = np.geomspace(t.min(), t.max() * 4, 60)      # the fitted curve, drawn a little past the last budget
    out.update(plateau=plateau, amplitude=amplitude, rate=rate,
               gap_to_plateau=[float(plateau - v) for v in y],
               rss=float(np.sum((y - saturating(t, *best)) ** 2)),
               curve={"budgets": [float(g * unit) for g in grid], "values": [float(v) for v in saturating(grid, *best)]})
    if draws is not None:
        draws = [np.asarray(d, np.float64) for d in draws]
        n = min(len(d) for d in draws)
        rng = np.random.default_rng(0)
        cols = np.stack([d[rng.permutation(len(d))[:n]] for d in draws], axis=1)   # independent across budgets
        plateaus = np.array([p[0] for p in (_fit(t, row, plateau_bounds) for row in cols) if p is not None])
        a = (1 - ci) / 2
        out["n_boot"] = int(n)
        out["n_fits_ok"] = int(len(plateaus))
        if out["identified"] and len(plateaus) >= max(20, n // 2):
            lo, hi = np.quantile(plateaus, [a, 1 - a])
            out["plateau_ci95"] = [float(lo), float(hi)]
        else:
            out["plateau_ci95"] = None
    return out


def within(fit: dict[str, Any], budget_index: int, tolerance: float) -> bool | None:
    """Whether the statistic at budget `budget_index` is within `tolerance` of the fitted plateau
    (judged against the far end of the plateau's interval, the conservative side). None when no
    plateau is identified (the curve has not begun to saturate: no budget can be called near it)."""
    if not (fit.get("ok") and fit.get("identified")):
        return None
    value = fit["estimates"][budget_index]
    ci = fit.get("plateau_ci95")
    far_end = max(ci, key=lambda p: abs(p - value)) if ci else fit["plateau"]
    return bool(abs(far_end - value) <= tolerance)


def convergence_table(points: Sequence[BudgetPoint], statistics: Sequence[str] = STATISTICS) -> list[dict[str, Any]]:
    """One row per point and statistic (for the notebook's table and the JSON)."""
    rows = []
    for p in points:
        for s in statistics:
            d = p.draws(s)
            lo, hi = (np.quantile(d, [0.025, 0.975]) if len(d) else (math.nan, math.nan))
            rows.append({"n_latents": p.n_latents, "budget": p.budget, "statistic": s, "value": p.value(s),
                         "ci95_seed": [float(lo), float(hi)]})
    return rows


def fits_by_size(points: Sequence[BudgetPoint], statistics: Sequence[str] = STATISTICS) -> dict[int, dict[str, Any]]:
    """`fit_plateau` per number of latents and statistic, over that size's budgets."""
    out: dict[int, dict[str, Any]] = {}
    for n in sorted({p.n_latents for p in points}):
        mine = sorted((p for p in points if p.n_latents == n), key=lambda p: p.budget)
        out[n] = {s: fit_plateau([p.budget for p in mine], [p.value(s) for p in mine], [p.draws(s) for p in mine],
                                 plateau_bounds=(0.0, 1.0) if s != "fvu" else (0.0, np.inf))
                  for s in statistics}
    return out
