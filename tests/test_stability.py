"""Tests for replication.analysis.stability: seed families, exact k-seed curve, fits, uncertainty."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from replication import matching as M
from replication import stability as S
from replication import stats
from replication.sae.directions import LatentDirections


def seed_family(n_seeds: int, n: int, d: int, seed: int = 0, frac: float = 0.5) -> list[LatentDirections]:
    """SAEs that share a noisy copy of `frac * n` common latents (each kept by a random
    subset of seeds) and otherwise hold their own random latents, rows shuffled."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((n, d))
    common /= np.linalg.norm(common, axis=1, keepdims=True)
    out = []
    for s in range(n_seeds):
        keep = rng.random(n) < frac
        dec = rng.standard_normal((n, d))
        dec /= np.linalg.norm(dec, axis=1, keepdims=True)
        dec[keep] = common[keep] + 0.25 * rng.standard_normal((keep.sum(), d)) / np.sqrt(d)
        enc = dec + 0.25 * rng.standard_normal((n, d)) / np.sqrt(d)
        perm = rng.permutation(n)
        out.append(LatentDirections(enc[perm], dec[perm], name=f"seed{s}"))
    return out


@pytest.fixture(scope="module")
def family() -> S.FamilyMatching:
    return S.FamilyMatching(seed_family(5, 60, 24, seed=3), cache=False, progress=False)


# --------------------------------------------------------------------------- k seeds
@pytest.mark.parametrize("n_seeds", [5, 6, 7, 9])
def test_kseed_exact_equals_bruteforce_random(n_seeds):
    rng = np.random.default_rng(n_seeds)
    n = 23
    p = rng.random((n_seeds, 1, n))  # latent-dependent sharing probability
    shared = rng.random((n_seeds, n_seeds, n)) < p
    shared[np.arange(n_seeds), np.arange(n_seeds)] = False
    exact = S.kseed_only_in_base(shared.sum(axis=1), n_seeds)
    brute = S.kseed_only_in_base_bruteforce(shared)
    assert list(exact) == list(range(2, n_seeds + 1))
    for k in exact:
        assert exact[k] == pytest.approx(brute[k], abs=1e-12), k
    vals = list(exact.values())
    assert all(b <= a + 1e-15 for a, b in zip(vals, vals[1:])), "curve must not increase with k"
    assert S.kseed_only_in_base(shared.sum(axis=1), n_seeds, ks=[1])[1] == 1.0


def test_kseed_exact_equals_bruteforce_on_real_matchings(family):
    for definition in M.DEFINITIONS:
        shared = family.shared(definition)
        exact = family.kseed_curve(definition)
        brute = S.kseed_only_in_base_bruteforce(shared)
        for k in exact:
            assert exact[k] == pytest.approx(brute[k], abs=1e-12)
    # agree-shared is a subset of threshold-shared, so more latents are base-only under it
    agree, thr = family.kseed_curve("agree"), family.kseed_curve("threshold")
    assert all(agree[k] >= thr[k] for k in agree)


def test_kseed_known_values():
    # N = 3: a latent shared with s = 0, 1, 2 others; k = 2 picks one other seed
    counts = np.array([[0, 1, 2, 2]])
    out = S.kseed_only_in_base(counts, 3)
    assert out[2] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert out[3] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        S.kseed_only_in_base(np.array([[3]]), 3)


# --------------------------------------------------------------------------- family
def test_family_inversion_consistency(family):
    N = family.n_seeds
    for i, j in itertools.permutations(range(N), 2):
        r, back = family.result(i, j), family.result(j, i)
        np.testing.assert_array_equal(back.dec_partner[r.dec_partner], np.arange(family.n_latents))
        np.testing.assert_array_equal(back.dec_cos[r.dec_partner], r.dec_cos)
    # the max-cosine baseline of j -> i is the column max of the i -> j cosine matrix
    a, b = family.seeds[0], family.seeds[3]
    C = M.cosine_matrix(a.encoder, b.encoder)
    np.testing.assert_array_equal(family.result(3, 0).enc_max_cos, C.max(axis=0))
    np.testing.assert_array_equal(family.result(0, 3).enc_max_cos, C.max(axis=1))
    with pytest.raises(ValueError):
        family.result(1, 1)


def test_family_shared_counts_and_similarity(family):
    N, n = family.n_seeds, family.n_latents
    sh = family.shared("threshold")
    assert sh.shape == (N, N, n) and not sh[np.arange(N), np.arange(N)].any()
    r = family.result(1, 2)
    # the agree definition is symmetric through the bijection (same pair both ways)
    ag = family.shared("agree")
    np.testing.assert_array_equal(ag[2, 1][r.dec_partner], ag[1, 2])
    assert ag[1, 2].sum() > 0
    both = (r.dec_cos > 0.7) & (r.enc_cos > 0.7)
    np.testing.assert_array_equal(sh[1, 2], both)
    counts = family.shared_counts("threshold")
    assert counts.shape == (N, n) and counts.max() <= N - 1
    np.testing.assert_array_equal(counts, sh.sum(axis=1))
    sim = family.mean_similarity()
    assert sim.shape == (N, n)
    manual = np.mean([0.5 * (family.result(0, j).dec_cos.astype(float) + family.result(0, j).enc_cos)
                      for j in range(1, N)], axis=0)
    np.testing.assert_allclose(sim[0], manual)
    # latents shared with every other seed are more similar than orphans
    assert sim[counts == N - 1].mean() > sim[counts == 0].mean() + 0.3
    tab = family.pair_table()
    assert len(tab) == N * (N - 1) and (tab["agree"] <= tab["threshold"]).all()


def test_family_from_results_and_errors(family):
    res = {(i, j): family.result(i, j) for i, j in itertools.combinations(range(family.n_seeds), 2)}
    again = S.FamilyMatching.from_results(family.n_seeds, res)
    np.testing.assert_array_equal(again.shared_counts(), family.shared_counts())
    del res[(0, 1)]
    with pytest.raises(KeyError):
        S.FamilyMatching.from_results(family.n_seeds, res)
    with pytest.raises(ValueError, match="definition"):
        family.shared("bogus")


# --------------------------------------------------------------------------- fits
def test_fit_power_law_recovers_offset_model():
    k = np.arange(2, 10, dtype=float)
    rng = np.random.default_rng(0)
    y = 0.6 * k ** -0.8 + 0.3 + rng.normal(0, 1e-4, k.size)
    out = stats.fit_power_law(k, y)
    p = out["with_offset"]["params"]
    assert p["a"] == pytest.approx(0.6, abs=0.01)
    assert p["b"] == pytest.approx(-0.8, abs=0.02)
    assert p["c"] == pytest.approx(0.3, abs=0.01)
    assert out["with_offset"]["stderr"]["c"] < 0.01
    assert out["f_test"]["p_value"] < 1e-3
    assert out["delta_aic"] < 0 and out["with_offset"]["rss"] < out["without_offset"]["rss"]
    json.dumps(out, allow_nan=False)  # plain JSON


def test_fit_power_law_without_offset_data():
    k = np.arange(2, 10, dtype=float)
    rng = np.random.default_rng(1)
    y = 0.7 * k ** -0.3 * (1 + rng.normal(0, 1e-3, k.size))
    out = stats.fit_power_law(k, y)
    p = out["without_offset"]["params"]
    assert p["a"] == pytest.approx(0.7, rel=0.01) and p["b"] == pytest.approx(-0.3, abs=0.01)
    assert out["f_test"]["p_value"] > 0.05
    np.testing.assert_allclose(stats.power_law(k, p["a"], p["b"]), y, rtol=0.01)
    with pytest.raises(ValueError):
        stats.fit_power_law(k[:3], y[:3])


# --------------------------------------------------------------------------- firing frequency
def test_frequency_table_and_masks():
    fc = np.array([[0, 5, 10], [3, 0, 1]])
    sim = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]])
    sc = np.array([[0, 2, 1], [1, 0, 2]])
    np.testing.assert_array_equal(S.live_mask(fc), fc > 0)
    np.testing.assert_allclose(S.firing_frequency(fc, 10), fc / 10)
    np.testing.assert_array_equal(S.dead_mask(fc), fc == 0)
    df = S.frequency_similarity_table(fc, 100, sim, sc)
    assert len(df) == 6 and set(df["seed"]) == {0, 1}
    row = df[(df.seed == 0) & (df.latent == 2)].iloc[0]
    assert row.frequency == pytest.approx(0.1) and row.log10_frequency == pytest.approx(-1.0)
    assert np.isnan(df[(df.seed == 0) & (df.latent == 0)].iloc[0].log10_frequency)
    h = S.stacked_histogram(df["similarity"], df["shared_with"], bins=4, group_values=[0, 1, 2])
    assert list(h.columns) == [0, 1, 2] and h.to_numpy().sum() == 6
    with pytest.raises(ValueError):
        S.frequency_similarity_table(fc, 100, sim[:, :2], sc)


# --------------------------------------------------------------------------- uncertainty
def test_bootstrap_ci_covers_truth():
    rng = np.random.default_rng(0)
    x = rng.random(4000) < 0.3
    ci = stats.bootstrap_ci(x, n_boot=400, seed=1)
    assert ci["low"] < 0.3 < ci["high"] and ci["high"] - ci["low"] < 0.05
    assert ci["estimate"] == pytest.approx(x.mean())
    med = stats.bootstrap_ci(rng.normal(2.0, 1.0, 3000), n_boot=200, stat="median")
    assert med["low"] < 2.0 < med["high"]
    assert stats.bootstrap_ci(x, n_boot=50, seed=3) == stats.bootstrap_ci(x, n_boot=50, seed=3)


def test_random_baseline_and_permutation_test():
    dirs = seed_family(1, 64, 32)[0]
    rnd = S.random_directions_like(dirs, seed=0)
    assert rnd.encoder.shape == dirs.encoder.shape
    np.testing.assert_allclose(np.linalg.norm(rnd.decoder, axis=1), 1.0, rtol=1e-5)
    chance = S.chance_shared_fractions(dirs, 0.7, seed=0)
    assert set(chance) == set(M.DEFINITIONS) and max(chance.values()) == 0.0
    rng = np.random.default_rng(0)
    same = stats.permutation_test(rng.normal(0, 1, 200), rng.normal(0, 1, 200), n_perm=300)
    shifted = stats.permutation_test(rng.normal(1, 1, 200), rng.normal(0, 1, 200), n_perm=300)
    assert same["p_value"] > 0.05 and shifted["p_value"] < 0.01


# --------------------------------------------------------------------------- threshold sweep
def test_threshold_sweep(family):
    res = [family.result(0, 1), family.result(2, 4)]
    sw = S.threshold_sweep(res)
    assert len(sw) == 100 and set(sw["pair"]) == {0, 1}
    cols = ["shared_threshold", "shared_agree", "shared_decoder", "shared_maxcos"]
    for _, g in sw.groupby("pair"):
        assert (np.diff(g[cols].to_numpy(), axis=0) <= 0).all()  # non-increasing in t
    assert (sw["shared_agree"] <= sw["shared_threshold"]).all()
    assert (sw["shared_threshold"] <= sw["shared_decoder"]).all()
    t = sw["threshold"].iloc[35]
    fr = M.shared_fractions(res[0], t)
    row = sw.iloc[35]
    assert all(row[f"shared_{k}"] == pytest.approx(v) for k, v in fr.items())
    assert isinstance(S.threshold_sweep(res[0], thresholds=[0.7]), pd.DataFrame)


def test_bimodality_separates_two_modes_from_one():
    from replication.analysis.stats import bimodality

    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(0.25, 0.06, 3000), rng.normal(0.85, 0.05, 2000)])
    one = rng.normal(0.5, 0.15, 5000)
    b2, b1 = bimodality(two), bimodality(one)
    assert b2["bimodal"] and b2["delta_bic_1_minus_2"] > 100
    assert abs(b2["gmm_2"]["means"][0] - 0.25) < 0.02 and abs(b2["gmm_2"]["means"][1] - 0.85) < 0.02
    assert abs(b2["gmm_2"]["weights"][1] - 0.4) < 0.03
    assert not b1["bimodal"] and b1["sarle_coefficient"] < 5 / 9


def test_power_law_fit_reports_failure_instead_of_raising():
    from replication.analysis.stats import fit_power_law

    out = fit_power_law([2, 3, 4, 5], [np.nan, 1.0, 1.0, 1.0])
    assert out["with_offset"]["ok"] is False or out["without_offset"]["ok"] is False
    assert out["f_test"]["p_value"] is None
    good = fit_power_law([2, 3, 4, 5, 6, 7, 8, 9], [0.3 * k ** -0.5 + 0.2 for k in range(2, 10)])
    assert good["with_offset"]["ok"] and abs(good["with_offset"]["params"]["c"] - 0.2) < 1e-3


# ------------------------------------------------------------------ calibration: verdicts that can say "no"
def _skewed_and_flat_nulls(name: str, rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    return {"beta(2,5)": lambda: rng.beta(2, 5, n), "gamma(2)": lambda: rng.gamma(2.0, 1.0, n),
            "lognormal(0,0.5)": lambda: rng.lognormal(0.0, 0.5, n), "uniform": lambda: rng.uniform(size=n)}[name]()


@pytest.mark.parametrize("null", ["beta(2,5)", "gamma(2)", "lognormal(0,0.5)", "uniform"])
def test_bimodality_verdict_says_no_on_unimodal_nulls(null) -> None:
    """Unimodal samples of Figure 1's size are called bimodal at most 1 time in 20 (the dip test's level).
    The old ΔBIC+Sarle rule fails this on the uniform null, so this test tells the two rules apart."""
    from replication.analysis.stats import bimodality

    draws = [bimodality(_skewed_and_flat_nulls(null, np.random.default_rng(seed))) for seed in range(20)]
    assert np.mean([d["bimodal"] for d in draws]) <= 0.05, null
    if null == "uniform":
        # the old verdict would not pass this test: proof that the calibration can fail
        assert np.mean([d["bimodal_old_rule"] for d in draws]) > 0.05


def test_bimodality_verdict_says_yes_on_two_modes() -> None:
    from replication.analysis.stats import bimodality

    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = np.r_[rng.normal(0.3, 0.1, 620), rng.normal(0.75, 0.08, 404)]
        out = bimodality(x)
        assert out["bimodal"] and out["dip_test"]["p_value"] < 0.05 and out["kde"]["n_modes"] >= 2


def _family_counts(rng: np.random.Generator, n_seeds: int = 9, n_latents: int = 1024, p: float = 0.34,
                   orphan_floor: float = 0.0) -> np.ndarray:
    """counts[b, l]: other seeds latent l of base b is shared with; a planted floor never shares."""
    shared = rng.random((n_seeds, n_latents, n_seeds - 1)) < p
    if orphan_floor:
        shared &= ~(rng.random((n_seeds, n_latents)) < orphan_floor)[..., None]
    return shared.sum(-1)


def test_offset_verdict_says_no_when_latents_are_shared_independently() -> None:
    """The issue's null: each latent shared with each other seed independently (p = 0.34). The F-test
    calls the offset significant; the bootstrap/orphan verdict must not."""
    from replication.analysis.stability import kseed_only_in_base, offset_evidence
    from replication.analysis.stats import fit_power_law

    for seed in range(5):
        counts = _family_counts(np.random.default_rng(seed))
        curve = kseed_only_in_base(counts, 9)
        old = fit_power_law(list(curve), list(curve.values()))
        assert old["f_test"]["p_value"] < 0.05            # the old, non-diagnostic verdict says "offset"
        new = offset_evidence(counts, 9, n_boot=200, seed=seed)
        assert not new["verdict_offset"]
        assert new["offset_ci95"][0] < 0 or new["excess_orphans_ci95"][0] <= 0
        lo, hi = new["excess_orphans_ci95"]
        assert lo <= 0.0 <= hi                             # no orphans beyond independence, within the interval


def test_offset_verdict_says_yes_with_a_floor_of_persistent_orphans() -> None:
    from replication.analysis.stability import offset_evidence

    counts = _family_counts(np.random.default_rng(1), p=0.7, orphan_floor=0.3)
    out = offset_evidence(counts, 9, n_boot=200)
    assert out["verdict_offset"]
    assert out["offset_ci95"][0] > 0.2 and abs(out["orphans_none_shared"] - 0.3) < 0.05


def test_offset_interval_is_independent_of_the_fit_route() -> None:
    """The histogram route used for resampling equals the exact integer curve."""
    from replication.analysis.stability import _curve_from_hist, kseed_only_in_base

    counts = _family_counts(np.random.default_rng(2))
    exact = kseed_only_in_base(counts, 9)
    hist = np.bincount(counts.ravel(), minlength=9).astype(float)
    np.testing.assert_allclose(_curve_from_hist(hist, 9, list(exact)), list(exact.values()), rtol=1e-12)


def test_pw_mcc_is_the_pair_mean_of_matched_decoder_cosines_and_untrained_sits_below_trained() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((48, 16)).astype(np.float32)
    seeds = [LatentDirections(base + 0.3 * rng.standard_normal(base.shape).astype(np.float32),
                              base + 0.3 * rng.standard_normal(base.shape).astype(np.float32), name=f"s{i}")
             for i in range(4)]
    fm = S.FamilyMatching(seeds, cache=False, progress=False)
    out = fm.pw_mcc(n_boot=200)
    expected = np.mean([fm.result(i, j).dec_cos.mean() for i in range(4) for j in range(i + 1, 4)])
    assert out["estimate"] == pytest.approx(expected, abs=1e-6)
    lo, hi = out["ci95_seed"]
    assert lo <= out["estimate"] <= hi and out["n_pairs"] == 6
    floor = S.untrained_pw_mcc("topk", 16, 48, 4, seeds=(0, 1, 2), n_boot=200, cache=False)
    assert 0 < floor["estimate"] < out["estimate"]
    same = S.FamilyMatching([seeds[0], seeds[0]], cache=False, progress=False).pw_mcc(n_boot=50)
    assert same["estimate"] == pytest.approx(1.0, abs=1e-6)
