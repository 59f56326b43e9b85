"""The float32-vs-bf16 agreement statistics: seed-resampled intervals and paired differences."""
from __future__ import annotations

import numpy as np
import pytest

from replication.dtype_check import _statistic, format_table, seed_bootstrap


def _stats(rng: np.random.Generator, n: int = 6, shared: float = 0.3, spread: float = 0.03) -> dict[str, np.ndarray]:
    pairs = rng.normal(shared, spread, (n, n))
    np.fill_diagonal(pairs, np.nan)
    return {"pairs": pairs, "only_in_base": rng.normal(0.4, 0.02, n), "fvu": rng.normal(0.27, 0.005, n)}


def test_estimates_are_plain_means_over_seeds_and_pairs() -> None:
    s = _stats(np.random.default_rng(0))
    est = _statistic(s, np.arange(6))
    assert est["shared_2seed"] == pytest.approx(np.nanmean(s["pairs"]))
    assert est["only_in_base_kN"] == pytest.approx(s["only_in_base"].mean())
    assert est["fvu"] == pytest.approx(s["fvu"].mean())
    # a resample that draws one seed twice uses only pairs of distinct draws
    dup = _statistic(s, np.array([0, 0, 1]))
    assert dup["shared_2seed"] == pytest.approx(np.mean([s["pairs"][0, 1]] * 2 + [s["pairs"][1, 0]] * 2))


def test_identical_runs_differ_by_exactly_zero() -> None:
    s = _stats(np.random.default_rng(1))
    out = seed_bootstrap({"float32": s, "bfloat16": s}, n_boot=200)
    for diff in out["differences"]["bfloat16 - float32"].values():
        assert diff["estimate"] == 0.0 and diff["ci95_seed"] == [0.0, 0.0]


def test_difference_interval_covers_zero_under_the_null_and_not_under_a_shift() -> None:
    """Calibration: two dtypes drawn from one distribution are called different rarely; a real
    shift of 3 between-seed standard deviations is found."""
    rng = np.random.default_rng(2)
    false_alarms = 0
    for _ in range(40):
        out = seed_bootstrap({"float32": _stats(rng), "bfloat16": _stats(rng)}, n_boot=300, seed=int(rng.integers(1e6)))
        false_alarms += not out["differences"]["bfloat16 - float32"]["fvu"]["interval_contains_zero"]
    assert false_alarms <= 8        # nominal 5% of 40 = 2; bootstrap intervals of 6 seeds run a little narrow
    shifted = _stats(rng)
    shifted["fvu"] = shifted["fvu"] + 0.015
    out = seed_bootstrap({"float32": _stats(rng), "bfloat16": shifted}, n_boot=300)
    assert not out["differences"]["bfloat16 - float32"]["fvu"]["interval_contains_zero"]


def test_table() -> None:
    s = _stats(np.random.default_rng(3))
    report = {"comparison": seed_bootstrap({"float32": s, "bfloat16": s}, n_boot=50)}
    table = format_table(report)
    assert "shared_2seed" in table and "float32" in table and "bfloat16" in table
