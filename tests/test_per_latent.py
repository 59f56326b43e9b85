"""Per-latent stability: reappearance probabilities, binomial intervals, labelling agreement, modes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from replication import per_latent
from replication.analysis.matching import match
from replication.analysis.stability import FamilyMatching
from replication.experiments import FamilySpec
from replication.sae.directions import LatentDirections


def _family(n_seeds: int = 5, n_latents: int = 40, d: int = 24, n_shared: int = 25, noise: float = 0.05, seed: int = 0):
    """Seeds share the first `n_shared` directions (plus noise); the rest are random per seed."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((n_shared, d))
    dirs = []
    for s in range(n_seeds):
        own = rng.standard_normal((n_latents - n_shared, d))
        w = np.concatenate([common + noise * rng.standard_normal(common.shape), own])
        perm = rng.permutation(n_latents)
        dirs.append(LatentDirections(w[perm], w[perm], name=f"s{s}", content_hash=f"h{seed}-{s}", meta={"perm": perm}))
    return dirs


def test_reappearance_recovers_planted_structure():
    dirs = _family()
    fm = FamilyMatching(dirs, cache=False, progress=False)
    for method in per_latent.METHODS:
        ev = per_latent.reappearance_events(fm, method=method, which="both", threshold=0.7)
        assert ev.shape == (5, 4, 40)
        p = per_latent.reappearance_probability(ev)
        planted = np.stack([d.meta["perm"] < 25 for d in dirs])
        assert np.all(p[planted] == 1.0)
        assert np.all(p[~planted] < 0.5)


def test_maxcos_and_hungarian_agree_on_clean_family():
    fm = FamilyMatching(_family(), cache=False, progress=False)
    ev_m = per_latent.reappearance_events(fm, "maxcos")
    ev_h = per_latent.reappearance_events(fm, "hungarian")
    agree = per_latent.labelling_agreement(ev_m, ev_h, ev_m.mean(1), ev_h.mean(1))
    assert agree["iou_events"] > 0.95 and agree["iou_stable"] > 0.95


def test_maxcos_is_superset_of_hungarian_decoder():
    """The row maximum is at least the matched cosine, so max-cosine labels every Hungarian event."""
    rng = np.random.default_rng(1)
    a = LatentDirections(rng.standard_normal((30, 8)), rng.standard_normal((30, 8)), name="a", content_hash="ra")
    b = LatentDirections(rng.standard_normal((30, 8)), rng.standard_normal((30, 8)), name="b", content_hash="rb")
    res = match(a, b, cache=False)
    h = per_latent.partner_mask(res, "hungarian", "decoder", 0.5)
    m = per_latent.partner_mask(res, "maxcos", "decoder", 0.5)
    assert np.all(m[h])


def test_bad_labelling_arguments():
    fm = FamilyMatching(_family(n_seeds=2), cache=False, progress=False)
    with pytest.raises(ValueError, match="method"):
        per_latent.partner_mask(fm.result(0, 1), method="cosine")
    with pytest.raises(ValueError, match="which"):
        per_latent.partner_mask(fm.result(0, 1), which="encoder")
    with pytest.raises(ValueError):
        per_latent.reappearance_probability(np.zeros(3, bool))


@pytest.mark.parametrize("x,n", [(0, 15), (1, 15), (7, 15), (15, 15), (3, 8)])
def test_intervals_cover_and_match_references(x, n):
    lo, hi = per_latent.wilson_interval(np.array([x]), n)
    assert lo[0] <= x / n <= hi[0]
    ref = stats.binomtest(x, n).proportion_ci(0.95, method="wilson")
    assert lo[0] == pytest.approx(ref.low, abs=1e-9) and hi[0] == pytest.approx(ref.high, abs=1e-9)
    lo, hi = per_latent.clopper_pearson_interval(np.array([x]), n)
    ref = stats.binomtest(x, n).proportion_ci(0.95, method="exact")
    assert lo[0] == pytest.approx(ref.low, abs=1e-9) and hi[0] == pytest.approx(ref.high, abs=1e-9)


def test_interval_coverage_by_simulation():
    rng = np.random.default_rng(0)
    p, n = 0.3, 15
    x = rng.binomial(n, p, size=4000)
    lo, hi = per_latent.clopper_pearson_interval(x, n)
    assert ((lo <= p) & (p <= hi)).mean() >= 0.95
    with pytest.raises(ValueError):
        per_latent.wilson_interval(np.array([16]), 15)
    with pytest.raises(ValueError):
        per_latent.wilson_interval(np.array([0.5]), 15)


def test_classes_and_iou():
    p = np.array([0.0, 0.04, 0.5, 0.96, 1.0])
    assert per_latent.stability_classes(p, 0.05).tolist() == ["unstable", "unstable", "intermediate", "stable", "stable"]
    assert per_latent.iou(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)) == 0.5
    assert per_latent.iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError):
        per_latent.iou(np.zeros(3, bool), np.zeros(4, bool))
    with pytest.raises(ValueError):
        per_latent.stability_classes(p, 0.6)


def test_binomial_mixture_finds_two_modes():
    rng = np.random.default_rng(0)
    n = 15
    x = np.concatenate([rng.binomial(n, 0.95, 600), rng.binomial(n, 0.05, 400)])
    two = per_latent.binomial_mixture(x, n, 2)
    assert two["p"][0] == pytest.approx(0.05, abs=0.02) and two["p"][1] == pytest.approx(0.95, abs=0.02)
    assert two["weights"][1] == pytest.approx(0.6, abs=0.04)
    s = per_latent.two_mode_summary(x / n, n)
    assert s["best_n_components"] >= 2 and s["u_shaped"] and s["delta_bic_1_minus_2"] > 100
    # a single binomial population is not split
    one = per_latent.two_mode_summary(rng.binomial(n, 0.5, 1000) / n, n)
    assert one["best_n_components"] == 1 and not one["u_shaped"]


def test_frequency_relation_sign():
    rng = np.random.default_rng(0)
    f = 10 ** rng.uniform(-4, -1, 500)
    p = np.clip((np.log10(f) + 4) / 3 + 0.1 * rng.standard_normal(500), 0, 1)
    f[:10] = 0
    rel = per_latent.frequency_relation(p, f)
    assert rel["spearman_rho"] > 0.8 and rel["n_dead"] == 10
    assert rel["bins"][-1]["mean_p"] > rel["bins"][0]["mean_p"]


def test_many_seed_spec_shares_training_key():
    base = FamilySpec(n_latents=1024, seeds=tuple(range(9)), checkpoint_at_tokens=(1000,))
    many = per_latent.many_seed_spec(base, 16, n_latents=256, k=16, n_tokens=2_000_000)
    assert many.seeds == tuple(range(16)) and many.n_latents == 256 and many.checkpoint_at_tokens == ()
    assert per_latent.many_seed_spec(base, 9, n_latents=256, k=16, n_tokens=2_000_000).training_key() == many.training_key()
    with pytest.raises(ValueError):
        per_latent.many_seed_spec(base, 1)
