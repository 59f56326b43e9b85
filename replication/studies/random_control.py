"""Random-model control ("dead salmon", issue #7, item 3).

The same SAE family is trained on the activations of the real model and of the same
architecture with random weights (`FamilySpec.random_model=True`, its own forward pass and
cache). If seed stability measures something about the model rather than about SAE training,
it should separate the two: `family_stability` summarises one family, `separation` compares two.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.matching import DEFAULT_THRESHOLD, match, shared_fractions
from ..analysis.stability import chance_shared_fractions
from ..analysis.stats import auc, permutation_test


def control_specs(base, **overrides: Any):
    """(real, random) `FamilySpec`s: `base` with the non-None `overrides`, no intermediate checkpoints."""
    known = set(base.__dataclass_fields__)
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ValueError(f"unknown FamilySpec fields in overrides: {bad}")
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    real = replace(base, **changes, checkpoint_at_tokens=(), random_model=False)
    return real, replace(real, random_model=True)


def family_stability(family, threshold: float = DEFAULT_THRESHOLD, definition: str = "threshold") -> dict[str, Any]:
    """Seed stability of one family: shared fraction per unordered seed pair, per-latent stability
    (shared count / other seeds), k-seed curve, matched cosines, FVU and dead fraction."""
    fm = family.matching
    pairs = fm.pair_table(threshold)
    pairs = pairs[pairs["base"] < pairs["other"]]          # a bijection: (i, j) and (j, i) share the same count
    counts = fm.shared_counts(definition, threshold)
    dec_cos = np.concatenate([fm.result(i, j).dec_cos for i in range(fm.n_seeds) for j in range(i + 1, fm.n_seeds)])
    table = family.training_table()
    return {
        "pair_shared_fraction": pairs[definition].to_numpy(),
        "mean_shared_fraction": float(pairs[definition].mean()),
        "latent_stability": (counts / (fm.n_seeds - 1)).ravel(),
        "shared_with_none": float((counts == 0).mean()),
        "shared_with_all": float((counts == fm.n_seeds - 1).mean()),
        "kseed_curve": fm.kseed_curve(definition, threshold),
        "matched_dec_cos": dec_cos,
        "median_matched_dec_cos": float(np.median(dec_cos)),
        "chance_shared_fraction": chance_shared_fractions(family.directions[0], threshold)[definition],
        "mean_fvu": float(table.fvu.mean()),
        "mean_dead_fraction": float(table.dead_fraction.mean()),
    }


def separation(real: dict[str, Any], random: dict[str, Any], n_perm: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Does stability tell the real model from the random one? Permutation test on the pair
    fractions and the AUC of per-latent stability (real > random)."""
    test = permutation_test(real["pair_shared_fraction"], random["pair_shared_fraction"], n_perm=n_perm, seed=seed)
    return {"pair_fraction_difference": test["observed"], "pair_fraction_p_value": test["p_value"],
            "latent_stability_auc": auc(real["latent_stability"], random["latent_stability"]),
            "pairs_disjoint": bool(real["pair_shared_fraction"].min() > random["pair_shared_fraction"].max()
                                   or real["pair_shared_fraction"].max() < random["pair_shared_fraction"].min())}


def cross_model_shared(real_family, random_family, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Shared fraction (threshold definition) between seed 0 of the real and of the random family."""
    res = match(real_family.directions[0], random_family.directions[0], cache=False)
    return shared_fractions(res, threshold)["threshold"]


__all__ = ["control_specs", "family_stability", "separation", "cross_model_shared", "ControlResult", "run_control"]


SUMMARY_KEYS = ("mean_shared_fraction", "shared_with_none", "shared_with_all", "median_matched_dec_cos",
                "chance_shared_fraction", "mean_fvu", "mean_dead_fraction")
"""The per-family numbers the notebook's table and the figure JSON report."""


@dataclass
class ControlResult:
    """The real-model family, its random-model twin, their stability and how well it separates them."""

    real: Any                      # experiments.SeedFamily
    random: Any
    stability: dict[str, dict[str, Any]]   # {"real": family_stability(...), "random": ...}
    separation: dict[str, Any]
    cross_model_shared: float
    threshold: float

    def table(self):
        """One column per family, one row per `SUMMARY_KEYS` entry."""

        return pd.DataFrame({name: {key: s[key] for key in SUMMARY_KEYS} for name, s in self.stability.items()})

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the figure JSON."""
        out: dict[str, Any] = {
            name: {"pair_shared_fraction": s["pair_shared_fraction"].tolist(),
                   "kseed_curve": {str(k): v for k, v in s["kseed_curve"].items()},
                   **{key: s[key] for key in SUMMARY_KEYS}}
            for name, s in self.stability.items()}
        out.update(separation=self.separation, cross_model_shared_fraction=self.cross_model_shared,
                   family_real=self.real.summary(), family_random=self.random.summary(),
                   # Song et al.'s PW-MCC of both families: the random-model family is its baseline
                   pw_mcc={"real": self.real.matching.pw_mcc(), "random_model": self.random.matching.pw_mcc()})
        return out


def run_control(base, threshold: float = DEFAULT_THRESHOLD, progress: bool = False, **overrides: Any) -> ControlResult:
    """Train (or load) the real and the random-model family of `base` (with `overrides`, see
    `control_specs`), and measure and compare their seed stability."""
    from ..experiments import seed_family

    spec_real, spec_random = control_specs(base, **overrides)
    real = seed_family(spec_real, progress=progress)
    random = seed_family(spec_random, progress=progress)
    stab = {"real": family_stability(real, threshold), "random": family_stability(random, threshold)}
    return ControlResult(real, random, stab, separation(stab["real"], stab["random"]),
                         cross_model_shared(real, random, threshold), threshold)
