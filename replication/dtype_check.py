"""Do the results depend on the compute dtype? Train one seed family per dtype and compare.

Why: `auto` gives bf16 forward passes and bf16 top-k selection on machines that run bf16 natively,
float32 elsewhere. Both must tell the same story. `dtype_agreement` trains the same family (same
text, same seeds, same batches) once per dtype, with the model's forward pass **and** the top-k
selection in that dtype, and compares the 2-seed shared fraction, the only-in-base fraction at
k = N seeds and the held-out FVU. Intervals resample **seeds** (the seeds are the same in both
runs, so the difference is paired), which is the variance that matters between families.

    python -m replication.dtype_check --profile smoke      # minutes
    python -m replication.dtype_check --profile default    # the core family twice (hours on 2 cores)
"""
from __future__ import annotations

import argparse
import itertools
import warnings
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from . import paths
from .analysis.matching import DEFAULT_THRESHOLD
from .analysis.stability import kseed_only_in_base
from .experiments import FamilySpec, SeedFamily, seed_family
from .io import write_json_atomic


def pair_matrix(family: SeedFamily, definition: str = "threshold", threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """[N, N] shared fraction of base i's latents in seed j (NaN on the diagonal), from `FamilyMatching.pair_table`."""
    fm = family.matching
    table = fm.pair_table(threshold)
    out = np.full((fm.n_seeds, fm.n_seeds), np.nan)
    out[table["base"].to_numpy(), table["other"].to_numpy()] = table[definition].to_numpy()
    return out


def family_statistics(family: SeedFamily, definition: str = "threshold",
                      threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
    """Per-seed ingredients: the pair matrix, only-in-base at k = N per base seed, held-out FVU per seed."""
    fm = family.matching
    counts = fm.shared_counts(definition, threshold)
    n = fm.n_seeds
    only = np.array([kseed_only_in_base(counts[b:b + 1], n, [n])[n] for b in range(n)])
    fvu = np.array([r.metrics["fvu"] for r in family.results], dtype=float)
    return {"pairs": pair_matrix(family, definition, threshold), "only_in_base": only, "fvu": fvu}


def _statistic(stats: dict[str, np.ndarray], seeds: np.ndarray) -> dict[str, float]:
    """The three headline numbers on a (re)sample of seed indices (pairs of distinct draws only)."""
    a, b = np.meshgrid(seeds, seeds, indexing="ij")
    keep = a != b
    pairs = stats["pairs"][a[keep], b[keep]]
    return {"shared_2seed": float(pairs.mean()) if pairs.size else float("nan"),
            "only_in_base_kN": float(stats["only_in_base"][seeds].mean()),
            "fvu": float(stats["fvu"][seeds].mean())}


def seed_bootstrap(per_dtype: dict[str, dict[str, np.ndarray]], n_boot: int = 2000, seed: int = 0,
                   ci: float = 0.95) -> dict[str, Any]:
    """Estimates and seed-resampled intervals per dtype, and of the paired differences between dtypes."""
    names = list(per_dtype)
    n = len(next(iter(per_dtype.values()))["fvu"])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    full = np.arange(n)
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out: dict[str, Any] = {"n_seeds": n, "n_boot": n_boot, "per_dtype": {}, "differences": {}}
    boot = {name: [_statistic(per_dtype[name], d) for d in draws] for name in names}
    for name in names:
        est = _statistic(per_dtype[name], full)
        out["per_dtype"][name] = {
            key: {"estimate": est[key], "ci95_seed": [float(np.nanpercentile([b[key] for b in boot[name]], lo)),
                                                      float(np.nanpercentile([b[key] for b in boot[name]], hi))]}
            for key in est}
    for first, second in itertools.combinations(names, 2):
        label = f"{second} - {first}"
        out["differences"][label] = {}
        for key in out["per_dtype"][first]:
            diffs = np.array([b2[key] - b1[key] for b1, b2 in zip(boot[first], boot[second])])
            low, high = float(np.nanpercentile(diffs, lo)), float(np.nanpercentile(diffs, hi))
            out["differences"][label][key] = {
                "estimate": out["per_dtype"][second][key]["estimate"] - out["per_dtype"][first][key]["estimate"],
                "ci95_seed": [low, high], "interval_contains_zero": bool(low <= 0.0 <= high)}
    return out


def dtype_agreement(base: FamilySpec, dtypes: Sequence[str] = ("float32", "bfloat16"), n_boot: int = 2000,
                    progress: bool = True) -> dict[str, Any]:
    """Train the family `base` once per forced dtype (forward + selection) and compare them."""
    per_dtype, specs = {}, {}
    for name in dtypes:
        spec = replace(base, model_dtype=name, select_dtype=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # forced bf16 on a CPU that emulates it: slow, allowed
            family = seed_family(spec, progress=progress)
        per_dtype[name] = family_statistics(family)
        specs[name] = {"resolved_dtypes": spec.resolved_dtypes(), "activation_cache": family.cache.folder.name,
                       "corpus_hash": family.cache.manifest["corpus"]["content_hash"],
                       "timings_s": family.timings, "mean_l0": float(family.training_table().l0.mean())}
    hashes = {s["corpus_hash"] for s in specs.values()}
    if len(hashes) != 1:
        raise RuntimeError(f"the dtype runs read different corpora ({hashes}); they must share the text")
    return {"families": specs, "comparison": seed_bootstrap(per_dtype, n_boot=n_boot),
            "definition": "threshold", "threshold": DEFAULT_THRESHOLD}


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table: one row per statistic, a column per dtype and the paired difference."""
    comp = report["comparison"]
    names = list(comp["per_dtype"])
    lines = [f"{'statistic':18}" + "".join(f"{n:>26}" for n in names) + f"{'difference':>34}"]
    for key in comp["per_dtype"][names[0]]:
        cells = "".join(f"{v['estimate']:>9.4f} [{v['ci95_seed'][0]:.4f}, {v['ci95_seed'][1]:.4f}]"
                        for v in (comp["per_dtype"][n][key] for n in names))
        diff = next(iter(comp["differences"].values()))[key]
        cells += f"{diff['estimate']:>+13.4f} [{diff['ci95_seed'][0]:+.4f}, {diff['ci95_seed'][1]:+.4f}]"
        lines.append(f"{key:18}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a profile's seed family in float32 and in bfloat16 and compare.")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    report = dtype_agreement(FamilySpec.from_profile(args.profile), n_boot=args.n_boot)
    report["profile"] = args.profile
    out = paths.figures_dir(args.profile) / "dtype_agreement.json"
    write_json_atomic(out, report, strict=True)
    print(format_table(report))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
