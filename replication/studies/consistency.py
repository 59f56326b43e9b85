"""Two views of stability on the same SAEs (notebook 17; Figure 5's architecture panel uses its families).

Paulo & Belrose count the latents shared at cosine > 0.7 (encoder and decoder); Song et al. average
the Hungarian-matched decoder cosine over seed pairs (PW-MCC). The papers rank architectures
differently. Here both are computed on the same families:

- `architecture_specs`: one seed family per architecture at the same activations, size, budget,
  seeds and checkpoints, with held-out L0 matched: TopK and BatchTopK at `k`, the penalised
  architectures (ReLU-L1, Gated, JumpReLU) calibrated on seed 0 (`ablations.match_sparsity`).
- `trajectory`: per checkpoint (log-spaced tokens) and at the end, PW-MCC and the shared fractions
  with seed-level intervals, held-out FVU and L0 (from each checkpoint's training.json).
- `ranking_agreement`: for every pair of architectures, the difference under each view with its
  seed-level interval, and whether the two views order the pair the same way.
- `baselines`: PW-MCC of untrained SAEs of each shape, and of families trained on the random model.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .. import paths
from ..io import read_json
from ..sae.checkpoints import TRAINING_INFO
from .ablations import Overlap, compare_overlaps, family_l0, family_overlap, match_sparsity, sparsity_spec

FIXED_K = ("topk", "batchtopk")
"""Architectures whose sparsity is set by k (no calibration)."""

SPARSITY_GRIDS: dict[str, tuple[float, ...]] = {
    "relu": (0.03, 0.1, 0.3, 1.0),        # L1 coefficient (norm-weighted L1, relative to FVU)
    "gated": (0.03, 0.1, 0.3, 1.0),
    "jumprelu": (0.001, 0.003, 0.01, 0.03),   # L0 coefficient (FVU + c * L0)
}
"""First calibration round per penalised architecture: the one home of these grids (Figure 5 and notebook 17
calibrate the same way, so an architecture's calibrated family is trained once for both)."""

VIEWS = {"pw_mcc": "PW-MCC (Song et al.)", "threshold": "shared fraction (Paulo & Belrose)",
         "decoder": "shared fraction, decoder only"}


ARCHITECTURE_PANEL_KEYS: tuple[str, ...] = ("arch_n_latents", "arch_n_tokens", "calibration_grids")
"""Settings of the architecture families that Figure 5 (notebook 07) shares with notebook 17, which owns them."""


def shared_architecture_settings(profile: str, **overrides: Any) -> dict[str, Any]:
    """Notebook 17's `ARCHITECTURE_PANEL_KEYS` for `profile` as papermill resolves them (its parameters cell,
    overlaid with its params file, their one home, where the profile has one), with any non-None value in
    `overrides` (a papermill parameter of notebook 07) taking precedence.

    Figure 5's architecture panel loads notebook 17's families, so both must ask for the same size, budget
    and first calibration round; reading them from one file keeps them equal."""
    return paths.borrowed_settings("17_consistency_views", profile, ARCHITECTURE_PANEL_KEYS, overrides,
                                   what="architecture-panel", missing_ok=True)


def architecture_base(spec: Any, n_latents: int | None = None, n_tokens: int | None = None,
                      seeds: Sequence[int] | None = None) -> Any:
    """The TopK family the architecture comparisons start from (Figure 5's panel and notebook 17 build it
    alike, so they share families): `spec` at `n_latents` and `n_tokens` (None: the spec's), `seeds`, and the
    spec's log-spaced checkpoints that fall inside the run."""
    n_tokens = int(n_tokens or spec.n_tokens)
    last = n_tokens - n_tokens % spec.batch_size            # the run ends at a whole number of batches
    return dataclasses.replace(spec, architecture="topk", n_latents=int(n_latents or spec.n_latents), n_tokens=n_tokens,
                               seeds=tuple(seeds) if seeds is not None else spec.seeds,
                               checkpoint_at_tokens=tuple(t for t in spec.checkpoint_at_tokens if t < last))


def architecture_specs(base: Any, architectures: Sequence[str], tolerance: float = 0.1,
                       grids: Mapping[str, Sequence[float]] | None = None, max_rounds: int = 4,
                       progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """One FamilySpec per architecture, every one on `base`'s activations, size, budget, seeds and checkpoints.

    The target is the TopK family's held-out L0 (`base` as TopK, trained or loaded here). BatchTopK's k is
    rescaled until its held-out L0 at the inference threshold matches; each penalised architecture gets the
    coefficient whose seed-0 held-out L0 lies within `tolerance` (relative) of the target. Returns
    (specs, matching) with `matching` holding the target, the calibration history and a verdict per
    architecture, and the first round's grids (`grids` over `SPARSITY_GRIDS`). "Matched L0" means the mean
    number of active latents per held-out token: the paper's own caveat applies (an L1 SAE's distribution of
    L0 over tokens is much wider than TopK's fixed k).
    """
    from ..experiments import seed_family

    unknown = [a for a in architectures if a not in (*FIXED_K, *SPARSITY_GRIDS)]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; choose from {[*FIXED_K, *SPARSITY_GRIDS]}")
    if base.k is None:
        raise ValueError("the base spec must be a TopK family with k set (its L0 is the target)")
    topk = dataclasses.replace(base, architecture="topk")
    target = family_l0(seed_family(topk, progress=progress))
    grids = {**SPARSITY_GRIDS, **(grids or {})}
    penalised = [a for a in architectures if a not in FIXED_K]
    calibration = (match_sparsity(topk, penalised, target, {a: grids[a] for a in penalised}, tolerance=tolerance,
                                  max_rounds=max_rounds, progress=progress) if penalised else {})
    if "batchtopk" in architectures:
        calibration["batchtopk"] = _calibrate_batchtopk_k(topk, target, tolerance, max_rounds, progress)
    specs = {}
    for a in architectures:
        if a == "topk":
            specs[a] = topk
        elif a == "batchtopk":
            specs[a] = dataclasses.replace(topk, architecture=a, k=calibration[a]["k"])
        else:
            specs[a] = sparsity_spec(topk, a, calibration[a]["l1_coefficient"])
    return specs, {"target_l0": target, "tolerance": tolerance, "calibration": calibration,
                   "first_round": {a: [float(c) for c in grids[a]] for a in penalised}}


def _calibrate_batchtopk_k(topk: Any, target: float, tolerance: float, max_rounds: int, progress: bool) -> dict[str, Any]:
    """BatchTopK's k whose held-out L0 (at its inference threshold) is within `tolerance` of `target`.

    The threshold is a running average of the smallest kept activation, so at inference a BatchTopK SAE
    fires more (or fewer) than k latents per token; k is rescaled by target / L0 on seed 0 until it matches.
    """
    from ..experiments import seed_family

    k, history = int(topk.k), []
    for _ in range(max_rounds):
        fam = seed_family(dataclasses.replace(topk, architecture="batchtopk", k=k, seeds=topk.seeds[:1]), progress=progress)
        history.append((k, family_l0(fam)))
        if abs(history[-1][1] / target - 1) <= tolerance:
            break
        k_next = max(1, min(topk.n_latents, round(k * target / max(history[-1][1], 1e-9))))
        if any(k_next == h[0] for h in history):
            break
        k = k_next
    best_k, best_l0 = min(history, key=lambda h: abs(np.log(max(h[1], 1e-9) / target)))
    return {"k": best_k, "l0": best_l0, "within_tolerance": bool(abs(best_l0 / target - 1) <= tolerance),
            "history": [{"k": kk, "l0": ll} for kk, ll in history], "target_l0": target, "tolerance": tolerance}


@dataclass
class CheckpointPoint:
    """One architecture at one token count: its overlap (both views) and its held-out metrics per seed."""

    architecture: str
    tokens: int
    overlap: Overlap
    fvu: np.ndarray
    l0: np.ndarray
    dead_fraction: np.ndarray

    def summary(self) -> dict[str, Any]:
        s = self.overlap.summary()
        return {"architecture": self.architecture, "tokens": self.tokens,
                "pw_mcc": s["pw_mcc"],
                "shared_fraction": {d: s["shared"][d] for d in ("threshold", "decoder", "agree")},
                "fvu": float(self.fvu.mean()), "fvu_per_seed": [float(v) for v in self.fvu],
                "l0": float(self.l0.mean()), "l0_per_seed": [float(v) for v in self.l0],
                "dead_fraction": float(self.dead_fraction.mean()),
                "n_seeds": s["n_seeds"], "n_latents": s["n_latents"]}


def metrics_at(family: Any, tokens: int | None) -> pd.DataFrame:
    """Held-out FVU, L0 and dead fraction per seed at an intermediate checkpoint (None: the final SAEs)."""
    if tokens is None:
        return family.training_table()[["seed", "fvu", "l0", "dead_fraction"]]
    rows = []
    for seed, res in zip(family.spec.seeds, family.results):
        info = read_json(res.intermediate_dirs[tokens] / family.spec.hook / TRAINING_INFO)
        m = info.get("metrics", {})
        rows.append({"seed": seed, "fvu": m.get("fvu"), "l0": m.get("l0"), "dead_fraction": m.get("dead_fraction")})
    return pd.DataFrame(rows)


def trajectory(architecture: str, family: Any, threshold: float = 0.7, n_boot: int = 500) -> list[CheckpointPoint]:
    """Both views and the held-out metrics at every intermediate checkpoint and at the end of training."""
    final = int(family.spec.n_tokens)
    out = []
    for t in [*sorted(int(t) for t in family.spec.checkpoint_at_tokens if int(t) < final), final]:
        directions = family.directions if t == final else family.directions_at(t)
        table = metrics_at(family, None if t == final else t)
        out.append(CheckpointPoint(architecture, t, family_overlap(directions, threshold, n_boot),
                                   table.fvu.to_numpy(float), table.l0.to_numpy(float),
                                   table.dead_fraction.to_numpy(float)))
    return out


def view_difference(a: Overlap, b: Overlap, view: str) -> dict[str, Any]:
    """b - a under one view, with the seed-level interval (independent bootstraps of the two families)."""
    if view != "pw_mcc":
        return compare_overlaps(a, b, view)
    da, db = (np.asarray(o.seed_level["pw_mcc"]["draws"]) for o in (a, b))
    n = min(len(da), len(db))
    lo, hi = np.quantile(db[:n] - da[:n], [0.025, 0.975])
    diff = b.seed_level["pw_mcc"]["estimate"] - a.seed_level["pw_mcc"]["estimate"]
    return {"difference": float(diff), "ci95_seed": [float(lo), float(hi)], "excludes_zero": bool(lo > 0 or hi < 0)}


def _sign(d: dict[str, Any]) -> int:
    lo, hi = d["ci95_seed"]
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


def ranking_agreement(final: Mapping[str, Overlap], views: Sequence[str] = ("pw_mcc", "threshold", "decoder"),
                      reference: str = "pw_mcc") -> dict[str, Any]:
    """Do the views rank the architectures alike? Per pair of architectures and view: the difference with its
    seed-level interval; a pair "agrees" when both views resolve it in the same direction, "disagrees" when
    they resolve it in opposite directions, and is "unresolved" otherwise. Also each view's point ranking."""
    archs = list(final)
    rank = {v: sorted(archs, key=lambda a: -(final[a].seed_level["pw_mcc"]["estimate"] if v == "pw_mcc"
                                            else final[a].mean(v))) for v in views}
    pairs = {}
    for a, b in itertools.combinations(archs, 2):
        diffs = {v: view_difference(final[a], final[b], v) for v in views}
        verdicts = {}
        for v in views:
            if v == reference:
                continue
            s_ref, s_v = _sign(diffs[reference]), _sign(diffs[v])
            verdicts[v] = ("agrees" if s_ref and s_ref == s_v else "disagrees" if s_ref and s_v and s_ref != s_v
                           else "unresolved")
        pairs[f"{b} - {a}"] = {"differences": diffs, f"vs_{reference}": verdicts}
    same_order = {v: rank[v] == rank[reference] for v in views if v != reference}
    return {"ranking": rank, "same_point_ranking": same_order, "pairs": pairs}


def baselines(specs: Mapping[str, Any], d_in: int, random_families: Mapping[str, Any] | None = None,
              n_boot: int = 500) -> dict[str, Any]:
    """PW-MCC floors per architecture: untrained SAEs of the same shape and seeds (their seeded initialisation),
    and, where given, the family trained on the random-initialised model."""
    from ..analysis.stability import untrained_pw_mcc

    out: dict[str, Any] = {"untrained": {}, "random_model": {}}
    for a, spec in specs.items():
        out["untrained"][a] = untrained_pw_mcc(a, d_in, spec.n_latents, spec.k if a in FIXED_K else None,
                                               spec.seeds, n_boot=n_boot)
    for a, fam in (random_families or {}).items():
        out["random_model"][a] = fam.matching.pw_mcc(n_boot=n_boot)
        out["random_model"][a]["fvu"] = float(fam.training_table().fvu.mean())
    return out
