"""Live-only matched cosines, stability fractions, hierarchical bootstrap, random baseline."""
from __future__ import annotations

import numpy as np
import pytest

from replication import live_only, stats
from replication.analysis.stability import FamilyMatching
from replication.sae.directions import LatentDirections


def _pair(n: int = 40, d: int = 32, n_dead: int = 10, seed: int = 0):
    """b is a noisy permuted copy of a's live latents; its dead latents are random."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    wb = w[perm] + 0.1 * rng.standard_normal((n, d))
    live_a = np.ones(n, bool)
    live_a[:n_dead] = False
    w[:n_dead] = rng.standard_normal((n_dead, d))          # dead latents of a: unrelated directions
    live_b = live_a[perm]
    a = LatentDirections(w, w, name="a", content_hash=f"a{seed}")
    b = LatentDirections(wb, wb, name="b", content_hash=f"b{seed}")
    return a, b, live_a, live_b


def test_live_only_raises_the_median():
    a, b, la, lb = _pair()
    full = live_only.matched_cosines(a, b)
    live = live_only.matched_cosines(a, b, la, lb)
    assert full.size == 40 and live.size == 30
    assert np.median(live) > 0.95 and np.min(live) > 0.9
    assert np.median(full) < np.median(live)
    assert live_only.stability_fraction(live, 0.9) == 1.0
    assert live_only.stability_fraction([full], 0.9) == pytest.approx((full >= 0.9).mean())
    with pytest.raises(ValueError):
        live_only.matched_cosines(a, b, la[:5], lb)
    assert live_only.matched_cosines(a, b, np.zeros(40, bool), lb).size == 0


def test_family_and_random_baseline():
    dirs = [_pair(seed=0)[0], _pair(seed=0)[1]]
    fm = FamilyMatching(dirs, cache=False, progress=False)
    fam = live_only.family_matched_cosines(fm)
    np.testing.assert_allclose(np.sort(fam[0]), np.sort(live_only.matched_cosines(*dirs)), atol=1e-5)
    rand = live_only.random_matched_cosines(dirs[0], n_pairs=2)
    assert len(rand) == 2 and np.median(np.concatenate(rand)) < 0.5
    live = np.ones((2, 40), bool)
    assert len(live_only.family_live_matched_cosines(dirs, live)) == 1


def test_hierarchical_bootstrap_and_summary():
    rng = np.random.default_rng(0)
    groups = [rng.normal(0.5 + 0.01 * g, 0.1, 200) for g in range(6)]
    b = stats.hierarchical_bootstrap(groups, n_boot=300)
    assert b["low"] < b["estimate"] < b["high"] and b["high"] - b["low"] < 0.1
    s = live_only.summarise(groups, thresholds=(0.9, 0.7), n_boot=200)
    assert s["n_pairs"] == 6 and 0 <= s["stability_fraction"]["0.9"]["estimate"] <= s["stability_fraction"]["0.7"]["estimate"]
    with pytest.raises(ValueError):
        stats.hierarchical_bootstrap([np.array([])])
