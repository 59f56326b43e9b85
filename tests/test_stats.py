"""Calibration of the statistics in `replication.analysis.stats` on nulls of the size we use them at."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from replication import stats


def _family(rng: np.random.Generator, n_seeds: int, tau: float, mu: float = 0.35, n_latents: int = 256):
    """Shared/not-shared indicators of a synthetic seed family whose pairs differ through seed effects:
    pair (i, j) shares each latent with probability mu + u_i + u_j, u ~ N(0, tau). The true mean is mu."""
    u = rng.normal(0.0, tau, n_seeds)
    pairs = list(itertools.combinations(range(n_seeds), 2))
    p = np.clip([mu + u[i] + u[j] for i, j in pairs], 0.01, 0.99)
    return (rng.random((len(pairs), n_latents)) < np.asarray(p)[:, None]).astype(float), pairs


def _coverage(n_seeds: int, tau: float, reps: int = 150, mu: float = 0.35) -> tuple[float, float]:
    rng = np.random.default_rng(12345)
    seed_hits = latent_hits = 0
    for r in range(reps):
        values, pairs = _family(rng, n_seeds, tau, mu)
        s = stats.seed_bootstrap(values, pairs, n_seeds, n_boot=300, seed=r)
        seed_hits += s["low"] <= mu <= s["high"]
        lat = stats.bootstrap_ci(values.mean(0), n_boot=300, seed=r)
        latent_hits += lat["low"] <= mu <= lat["high"]
    return seed_hits / reps, latent_hits / reps


@pytest.mark.parametrize("n_seeds", [4, 9])
def test_seed_bootstrap_covers_the_truth_when_seeds_differ(n_seeds: int) -> None:
    """With seed-to-seed variation, the latent-only interval misses the true mean most of the time; the
    hierarchical one covers it close to its nominal 95% (percentile bootstraps over few seeds run a little
    under: ~0.87-0.90 here)."""
    seed_cov, latent_cov = _coverage(n_seeds, tau=0.05)
    assert seed_cov >= 0.8, seed_cov
    assert latent_cov <= 0.5, latent_cov          # the old intervals: proof that this test can fail


def test_seed_bootstrap_without_seed_effects_is_not_too_wide() -> None:
    seed_cov, latent_cov = _coverage(6, tau=0.0, reps=100)
    assert seed_cov >= 0.9 and latent_cov >= 0.85


def test_seed_bootstrap_estimate_and_errors() -> None:
    values = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    pairs = [(0, 1), (0, 2), (1, 2)]
    out = stats.seed_bootstrap(values, pairs, 3, n_boot=200)
    assert out["estimate"] == pytest.approx(0.5) and out["low"] <= 0.5 <= out["high"]
    with pytest.raises(ValueError, match="n_pairs"):
        stats.seed_bootstrap(values[:2], pairs, 3)
    with pytest.raises(ValueError, match="distinct seed indices"):
        stats.seed_bootstrap(values, [(0, 0), (0, 2), (1, 2)], 3)
