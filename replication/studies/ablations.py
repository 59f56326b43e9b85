"""Ablations of seed overlap (paper Figures 4, 5 and A3): one number with an interval per sweep point.

- `family_overlap`: match every seed pair of a family once and summarise the shared fraction
  under each definition (mean over pairs, spread over pairs, bootstrap interval over latents),
  plus the mean matched and mean max cosine of Figure A3.
- `compare_overlaps` / `trend`: the direction of an effect with an interval (difference of two
  points, rank correlation along a sweep), used by the notebooks' "does it hold" tables.
- `match_sparsity`: pick the L1 coefficient of ReLU / Gated SAEs so that their held-out L0
  matches a TopK SAE's k (the architecture panel compares at matched sparsity).
- `sweep_specs`: the FamilySpecs of a sweep (one field varied), trained together by
  `experiments.seed_families` where they share a batch stream.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..analysis.matching import DEFAULT_THRESHOLD, DEFINITIONS, shared_masks
from ..analysis.stats import seed_bootstrap
from ..sae.directions import LatentDirections


# ----------------------------------------------------------------------------------- overlap
@dataclass
class Overlap:
    """Shared-latent statistics of one seed family (one sweep point).

    `per_pair[d]` holds the shared fraction of each unordered seed pair under definition `d`
    (the fraction is the same from either side of a bijection); `draws[d]` are bootstrap
    replicates of the pair-averaged fraction, resampling the base latents.
    """

    n_seeds: int
    n_latents: int
    threshold: float
    per_pair: dict[str, np.ndarray]
    draws: dict[str, np.ndarray]
    mean_matched_cos: dict[str, float]
    mean_max_cos: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    # stats.seed_bootstrap per definition (with draws), and "pw_mcc": FamilyMatching.pw_mcc
    seed_level: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mean(self, definition: str = "threshold") -> float:
        return float(self.per_pair[definition].mean())

    def interval(self, definition: str = "threshold", ci: float = 0.95, level: str = "latent") -> tuple[float, float]:
        """Bootstrap interval of the pair-averaged fraction: `level` "latent" resamples base latents only,
        "seed" seeds then latents (what plots and verdicts use; it includes the variance between seeds)."""
        draws = self.draws[definition] if level == "latent" else self.seed_level[definition]["draws"]
        lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
        return float(lo), float(hi)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: per definition the mean, pair spread and bootstrap interval."""
        shared = {}
        for d, v in self.per_pair.items():
            lo, hi = self.interval(d)
            shared[d] = {"mean": float(v.mean()), "std_over_pairs": float(v.std()), "ci95": [lo, hi],
                         "per_pair": [float(x) for x in v]}
            if d in self.seed_level:
                shared[d]["ci95_seed"] = [self.seed_level[d]["low"], self.seed_level[d]["high"]]
        out = {"n_seeds": self.n_seeds, "n_pairs": len(next(iter(self.per_pair.values()))),
               "n_latents": self.n_latents, "threshold": self.threshold, "shared": shared,
               "mean_matched_cos": self.mean_matched_cos, "mean_max_cos": self.mean_max_cos, **self.extra}
        if "pw_mcc" in self.seed_level:   # Song et al.'s PW-MCC: mean Hungarian-matched decoder cosine over pairs
            pw = self.seed_level["pw_mcc"]
            out["pw_mcc"] = {"estimate": pw["estimate"], "ci95_seed": pw["ci95_seed"]}
        return out


def family_overlap(directions: Sequence[LatentDirections], threshold: float = DEFAULT_THRESHOLD, n_boot: int = 1000,
                   seed: int = 0, progress: bool = False, **extra: Any) -> Overlap:
    """Match every seed pair once (cached on disk) and summarise the shared latents.

    Pair spread shows seed-to-seed variation; the bootstrap resamples base latents (the same
    resampled indices for every pair), so its interval reflects the finite number of latents.
    `extra` is stored as is in the summary (e.g. L0, FVU, the sweep value).
    """
    from ..analysis.stability import FamilyMatching

    if len(directions) < 2:
        raise ValueError(f"overlap needs at least 2 seeds, got {len(directions)}")
    fm = FamilyMatching(list(directions), progress=progress)
    pairs = list(itertools.combinations(range(fm.n_seeds), 2))
    masks = {d: np.empty((len(pairs), fm.n_latents), bool) for d in DEFINITIONS}
    cos = {key: np.empty(len(pairs)) for key in ("dec", "enc", "dec_max", "enc_max")}
    for p, (i, j) in enumerate(pairs):
        res = fm.result(i, j)
        for d, m in shared_masks(res, threshold).items():
            masks[d][p] = m
        cos["dec"][p], cos["enc"][p] = res.dec_cos.mean(), res.enc_cos.mean()
        cos["dec_max"][p], cos["enc_max"][p] = res.dec_max_cos.mean(), res.enc_max_cos.mean()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, fm.n_latents, size=(n_boot, fm.n_latents))
    per_latent = {d: m.mean(axis=0) for d, m in masks.items()}
    return Overlap(
        n_seeds=fm.n_seeds, n_latents=fm.n_latents, threshold=threshold,
        per_pair={d: m.mean(axis=1) for d, m in masks.items()},
        draws={d: v[idx].mean(axis=1) for d, v in per_latent.items()},
        mean_matched_cos={"dec": float(cos["dec"].mean()), "enc": float(cos["enc"].mean())},
        mean_max_cos={"dec": float(cos["dec_max"].mean()), "enc": float(cos["enc_max"].mean())},
        extra=dict(extra),
        seed_level={**{d: seed_bootstrap(m, pairs, fm.n_seeds, n_boot=n_boot, seed=seed + 1, return_draws=True)
                       for d, m in masks.items()},
                    "pw_mcc": fm.pw_mcc(n_boot=n_boot, seed=seed + 2, return_draws=True)},
    )


def overlap_frame(points: Mapping[Any, Overlap], axis: str = "value") -> pd.DataFrame:
    """One row per sweep point and definition: mean, pair spread, interval, A3 cosines."""
    rows = []
    for value, ov in points.items():
        for d in ov.per_pair:
            lo, hi = ov.interval(d, level="seed" if d in ov.seed_level else "latent")
            rows.append({axis: value, "definition": d, "shared": ov.mean(d), "pair_std": float(ov.per_pair[d].std()),
                         "ci_low": lo, "ci_high": hi, "n_seeds": ov.n_seeds, "n_latents": ov.n_latents,
                         "mean_matched_dec": ov.mean_matched_cos["dec"], "mean_max_dec": ov.mean_max_cos["dec"],
                         "mean_matched_enc": ov.mean_matched_cos["enc"], "mean_max_enc": ov.mean_max_cos["enc"],
                         "per_pair": ov.per_pair[d].tolist(),
                         **{k: v for k, v in ov.extra.items() if np.isscalar(v)}})
    return pd.DataFrame(rows)


def _pooled(points: Overlap | Sequence[Overlap], definition: str, level: str = "latent") -> tuple[float, np.ndarray]:
    """Mean and bootstrap draws of one point, or of the average of several points; `level` "latent"
    resamples base latents, "seed" seeds then latents (`stats.seed_bootstrap`)."""
    group = [points] if isinstance(points, Overlap) else list(points)
    if not group:
        raise ValueError("cannot compare an empty group of sweep points")
    draws = [ov.draws[definition] if level == "latent" else ov.seed_level[definition]["draws"] for ov in group]
    n = min(len(d) for d in draws)
    mean = float(np.mean([ov.mean(definition) for ov in group]))
    return mean, np.mean([d[:n] for d in draws], axis=0)


def compare_overlaps(a: Overlap | Sequence[Overlap], b: Overlap | Sequence[Overlap],
                     definition: str = "threshold") -> dict[str, Any]:
    """b - a with 95% bootstrap intervals. Either side may be a group of points (averaged), e.g. the
    middle layers vs the first and last; points are bootstrapped independently. `ci95_seed` resamples
    seeds then latents and is the one verdicts read (`claims.effect_row`); `ci95` resamples latents only
    and is kept for comparison: it ignores the variance between seeds and is too narrow."""
    points = [a] if isinstance(a, Overlap) else list(a)
    points += [b] if isinstance(b, Overlap) else list(b)
    levels = [("latent", "ci95")]
    if all(definition in ov.seed_level for ov in points):
        levels.append(("seed", "ci95_seed"))
    out: dict[str, Any] = {}
    for level, key in levels:
        mean_a, draws_a = _pooled(a, definition, level)
        mean_b, draws_b = _pooled(b, definition, level)
        n = min(len(draws_a), len(draws_b))
        lo, hi = np.quantile(draws_b[:n] - draws_a[:n], [0.025, 0.975])
        out.update({"difference": mean_b - mean_a, key: [float(lo), float(hi)]})
    lo, hi = out.get("ci95_seed", out["ci95"])
    out["excludes_zero"] = bool(lo > 0 or hi < 0)
    return out


def trend(values: Sequence[float], overlaps: Sequence[Overlap], definition: str = "threshold") -> dict[str, Any]:
    """Direction of a sweep: Spearman rank correlation of the means with the swept value, and
    the change from the first to the last point with its interval."""
    means = [ov.mean(definition) for ov in overlaps]
    rho = stats.spearmanr(values, means).statistic if len(values) > 2 else float("nan")
    ends = compare_overlaps(overlaps[0], overlaps[-1], definition)
    return {"definition": definition, "values": list(values), "means": means,
            "spearman_rho": None if rho is None or math.isnan(rho) else float(rho),
            "first_to_last": ends}


# ------------------------------------------------------------------------------------ sweeps
def sweep_overlaps(values: Sequence[Any], specs: Sequence[Any], threshold: float = DEFAULT_THRESHOLD,
                   n_boot: int = 1000, progress: bool = True, families: Sequence[Any] | None = None) -> dict[Any, Overlap]:
    """Train (or load) one seed family per sweep value and measure its overlap.

    Specs that share a batch stream are trained in one pass (`experiments.seed_families`); each
    point's summary also records its mean held-out L0, FVU and dead fraction.
    """
    from ..experiments import seed_families

    if len(values) != len(specs):
        raise ValueError(f"{len(values)} sweep values but {len(specs)} family specs")
    from ..analysis.stability import untrained_pw_mcc

    families = list(families) if families is not None else seed_families(specs, progress=progress)
    out: dict[Any, Overlap] = {}
    for value, fam in zip(values, families):
        s, sp = fam.summary(), fam.spec
        # PW-MCC's floor at this point's shape: the same seeds' untrained SAEs (no training, a few matchings)
        floor = untrained_pw_mcc(sp.architecture, fam.cache.d_model, sp.n_latents,
                                 sp.k if sp.architecture in ("topk", "batchtopk") else None, sp.seeds, n_boot=n_boot)
        out[value] = family_overlap(fam.directions, threshold, n_boot, l0=s["mean_l0"], fvu=s["mean_fvu"],
                                    dead_fraction=s["mean_dead_fraction"], n_latents_sae=sp.n_latents,
                                    schedule_tokens=sp.n_tokens,   # the budget of this point's own LR schedule
                                    training_s=s["timings_s"].get("training_s"),
                                    pw_mcc_untrained={"estimate": floor["estimate"], "ci95_seed": floor["ci95_seed"]})
    return out


def checkpoint_overlaps(family: Any, threshold: float = DEFAULT_THRESHOLD, n_boot: int = 1000) -> dict[int, Overlap]:
    """Overlap of a family at each intermediate checkpoint and at the end of training (tokens sweep)."""
    final_tokens = family.results[0].metrics.get("tokens") or family.spec.n_tokens
    out = {int(t): family_overlap(family.directions_at(int(t)), threshold, n_boot)
           for t in sorted(family.spec.checkpoint_at_tokens)}
    out[int(final_tokens)] = family_overlap(family.directions, threshold, n_boot)
    return out


def sweep_specs(base: Any, field_name: str, values: Iterable[Any], **overrides: Any) -> list[Any]:
    """FamilySpecs equal to `base` except `field_name` (and `overrides`), one per value."""
    if field_name not in base.__dataclass_fields__:
        raise ValueError(f"FamilySpec has no field {field_name!r}")
    return [replace(base, **{field_name: v}, **overrides) for v in values]


def family_l0(family: Any) -> float:
    """Mean held-out L0 over the family's seeds (from the training metrics)."""
    l0 = [r.metrics.get("l0") for r in family.results]
    if any(v is None for v in l0):
        raise ValueError("a checkpoint lacks its held-out L0 metric; train with held-out activations")
    return float(np.mean(l0))


def _next_coefficient(history: Sequence[tuple[float, float]], target: float) -> float:
    """Log-log interpolation of L0(coefficient) at `target` from the two nearest measurements
    that bracket it (or the two nearest at all when none bracket it: extrapolation)."""
    pts = sorted((c, l) for c, l in history if l > 0 and c > 0)
    if not pts:
        raise ValueError("no calibration run produced a positive L0")
    if len(pts) == 1:
        return pts[0][0] * (pts[0][1] / target)  # L0 roughly inversely proportional to the penalty
    below = [(c, l) for c, l in pts if l <= target]
    above = [(c, l) for c, l in pts if l > target]
    if below and above:
        (c1, l1), (c2, l2) = max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])
        anchor = (c1, l1)
    else:   # extrapolate from the end of the grid nearest the target: the largest penalties if L0 is still too high
        (c1, l1), (c2, l2) = pts[-2:] if above else pts[:2]
        anchor = pts[-1] if above else pts[0]
    slope = ((math.log(l2) - math.log(l1)) / (math.log(c2) - math.log(c1))) if (l1 != l2 and c1 != c2) else 0.0
    if slope >= 0:  # L0 should fall as the penalty grows; fall back to a proportional step
        log_c = math.log(anchor[0] * anchor[1] / target)   # (L0 roughly inversely proportional to the penalty)
    else:
        log_c = math.log(c1) + (math.log(target) - math.log(l1)) / slope
    # An L0 that barely responds (slope ~ 0) would extrapolate to an absurd (or overflowing) coefficient:
    # go at most one decade beyond the coefficients measured so far per round.
    lo, hi = math.log(pts[0][0] / 10), math.log(pts[-1][0] * 10)
    return float(math.exp(min(max(log_c, lo), hi)))


def sparsity_spec(base: Any, architecture: str, l1_coefficient: float, seeds: Sequence[int] | None = None) -> Any:
    """`base` as an L1-penalised architecture (no k) at `l1_coefficient`."""
    return replace(base, architecture=architecture, k=None, l1_coefficient=float(l1_coefficient),
                   seeds=tuple(seeds) if seeds is not None else base.seeds)


def d_model(spec: Any) -> int:
    """Activation width at a spec's hook, from the model's config (every supported site is d_model wide).

    Reading the config, not the activation cache, matters: a cache built only to learn its width
    would hold the spec's own hook set, which a sweep may never train on (a wasted forward pass).
    """
    from ..lm.activations import parse_hook
    from ..lm.models import model_config

    parse_hook(spec.hook)  # the clear error for an unsupported hook
    return int(model_config(spec.model_name).d_model)


def match_sparsity(base: Any, architectures: Sequence[str], target_l0: float,
                   coefficients: Sequence[float] | Mapping[str, Sequence[float]] = (0.05, 0.1, 0.2, 0.4),
                   tolerance: float = 0.2, max_rounds: int = 4, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Find, per architecture, an L1 coefficient whose held-out L0 is within `tolerance` of
    `target_l0`, training the first seed of `base` only. `coefficients` is the first round's grid,
    one for all architectures or one per architecture (a mapping).

    Round 1 trains every (architecture, coefficient) of the grid in one pass over the data;
    later rounds train the log-log interpolated coefficient of each architecture not yet within
    tolerance. Every run is cached like any family, so the final family at the chosen coefficient
    reuses its first seed. Returns {arch: {"l1_coefficient", "l0", "within_tolerance", "history"}}.
    """
    from ..experiments import seed_families

    first = (base.seeds[0],)
    history: dict[str, list[tuple[float, float]]] = {a: [] for a in architectures}
    if isinstance(coefficients, Mapping):
        missing = [a for a in architectures if a not in coefficients]
        if missing:
            raise ValueError(f"no calibration grid for {missing}; the grids cover {sorted(coefficients)}")
        todo = {a: list(coefficients[a]) for a in architectures}
    else:
        todo = {a: list(coefficients) for a in architectures}
    chosen: dict[str, dict[str, Any]] = {}
    for _ in range(max_rounds):
        specs, owners = [], []
        for arch, coefs in todo.items():
            for c in coefs:
                specs.append(sparsity_spec(base, arch, c, seeds=first))
                owners.append(arch)
        for spec, fam, arch in zip(specs, seed_families(specs, progress=progress), owners):
            history[arch].append((spec.l1_coefficient, family_l0(fam)))
        todo = {}
        for arch in architectures:
            if arch in chosen and chosen[arch]["within_tolerance"]:
                continue
            best_c, best_l0 = min(history[arch], key=lambda p: abs(math.log(max(p[1], 1e-9) / target_l0)))
            ok = abs(best_l0 / target_l0 - 1) <= tolerance
            chosen[arch] = {"l1_coefficient": best_c, "l0": best_l0, "within_tolerance": ok}
            if not ok:
                todo[arch] = [round(_next_coefficient(history[arch], target_l0), 6)]
        if not todo:
            break
    for arch in architectures:
        chosen[arch]["history"] = [{"l1_coefficient": c, "l0": l} for c, l in history[arch]]
        chosen[arch]["target_l0"] = target_l0
        chosen[arch]["tolerance"] = tolerance
    return chosen
