"""Ablation statistics (Figures 4, 5, A3): overlap per sweep point, effects with intervals,
and the L1 calibration used to compare architectures at matched sparsity."""
from __future__ import annotations

import math

import numpy as np
import pytest

from replication import ablations, claims
from replication.experiments import FamilySpec
from replication.sae.directions import LatentDirections


def random_directions(n: int, d: int, seed: int, name: str = "") -> LatentDirections:
    rng = np.random.default_rng(seed)
    return LatentDirections(rng.standard_normal((n, d)), rng.standard_normal((n, d)), name=name or f"r{seed}")


def shuffled(dirs: LatentDirections, seed: int) -> LatentDirections:
    perm = np.random.default_rng(seed).permutation(len(dirs.encoder))
    return LatentDirections(dirs.encoder[perm], dirs.decoder[perm], name=f"{dirs.name}-shuffled{seed}")


def test_shuffled_copies_are_fully_shared(tmp_data):
    base = random_directions(64, 16, 0)
    ov = ablations.family_overlap([base, shuffled(base, 1), shuffled(base, 2)], n_boot=50)
    assert ov.n_seeds == 3 and len(ov.per_pair["threshold"]) == 3
    for d in ("threshold", "agree", "decoder"):
        assert ov.mean(d) == pytest.approx(1.0)
        assert ov.interval(d) == pytest.approx((1.0, 1.0))
    assert ov.mean_matched_cos["dec"] == pytest.approx(1.0, abs=1e-5)
    assert ov.mean_max_cos["enc"] == pytest.approx(1.0, abs=1e-5)


def test_independent_directions_share_nothing(tmp_data):
    ov = ablations.family_overlap([random_directions(64, 64, s) for s in range(3)], n_boot=50, l0=4.0)
    assert ov.mean("threshold") == 0.0
    # max cosine is never below the Hungarian-matched cosine
    assert ov.mean_max_cos["dec"] >= ov.mean_matched_cos["dec"] - 1e-6
    summary = ov.summary()
    assert summary["l0"] == 4.0 and summary["n_pairs"] == 3
    frame = ablations.overlap_frame({7: ov}, "size")
    assert set(frame.definition) == {"threshold", "agree", "decoder", "maxcos"} and (frame["size"] == 7).all()


def test_overlap_needs_two_seeds(tmp_data):
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ablations.family_overlap([random_directions(8, 4, 0)])


def half_shared(n: int, shared: int, seed: int) -> list[LatentDirections]:
    """Two SAEs whose first `shared` latents coincide and the rest are independent."""
    a = random_directions(n, 64, seed)
    b = random_directions(n, 64, seed + 100)
    b.encoder[:shared], b.decoder[:shared] = a.encoder[:shared], a.decoder[:shared]
    return [a, LatentDirections(b.encoder, b.decoder, name=f"half{seed}")]


def test_compare_and_effect_rows(tmp_data):
    low = ablations.family_overlap(half_shared(64, 8, 0), n_boot=200)
    high = ablations.family_overlap(half_shared(64, 48, 1), n_boot=200)
    assert low.mean() == pytest.approx(8 / 64) and high.mean() == pytest.approx(48 / 64)
    up = ablations.compare_overlaps(low, high)
    assert up["difference"] == pytest.approx(40 / 64) and up["excludes_zero"] and up["ci95"][0] > 0
    assert claims.effect_row("c", "p", up, +1)["holds"] == "yes"
    assert claims.effect_row("c", "p", up, -1)["holds"] == "opposite"
    same = ablations.compare_overlaps(low, low)
    assert claims.effect_row("c", "p", same, +1)["holds"].startswith("not resolved")
    assert claims.effect_row("c", "p", up, 0)["holds"] == "no paper direction: resolved"
    with pytest.raises(ValueError, match="expected_sign"):
        claims.effect_row("c", "p", up, 2)
    grouped = ablations.compare_overlaps([low, low], [high, low])
    assert grouped["difference"] == pytest.approx(20 / 64)
    tr = ablations.trend([1, 2, 3], [low, high, high])
    assert tr["spearman_rho"] > 0 and tr["first_to_last"]["difference"] == pytest.approx(40 / 64)
    assert "Spearman" in claims.effect_row("c", "p", tr, +1)["ours"]


def test_next_coefficient_interpolates_a_power_law():
    def l0(c: float) -> float:
        return 3.0 * c ** -1.5

    target = 20.0
    exact = (3.0 / target) ** (1 / 1.5)
    history = [(c, l0(c)) for c in (0.03, 0.1, 0.3, 1.0)]
    assert ablations._next_coefficient(history, target) == pytest.approx(exact, rel=1e-9)
    # extrapolation beyond the grid, and a single measurement (L0 ~ 1 / coefficient)
    assert ablations._next_coefficient(history[2:], target) == pytest.approx(exact, rel=1e-9)
    assert ablations._next_coefficient([(0.5, 10.0)], 20.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive L0"):
        ablations._next_coefficient([(0.1, 0.0)], 5.0)
    # an L0 that does not respond to the penalty (JumpReLU whose thresholds cannot move): one decade further per
    # round, not an overflow (the default run of notebook 17 died of `math.exp` on such a history)
    flat = [(0.001, 511.756), (0.003, 511.757), (0.01, 511.756), (0.03, 511.7561)]
    assert ablations._next_coefficient(flat, 32.0) == pytest.approx(0.3)
    assert ablations._next_coefficient([(0.1, 40.0), (0.3, 39.99)], 32.0) == pytest.approx(3.0)
    assert math.isfinite(ablations._next_coefficient([(0.1, 5.0), (0.2, 9.0)], 7.0))  # wrong slope: safe step


def test_sweep_specs_and_sparsity_spec():
    base = FamilySpec(n_latents=256, k=16, seeds=(0, 1))
    specs = ablations.sweep_specs(base, "n_latents", [64, 128])
    assert [s.n_latents for s in specs] == [64, 128] and all(s.k == 16 for s in specs)
    assert specs[0].training_key() != specs[1].training_key()
    with pytest.raises(ValueError, match="no field"):
        ablations.sweep_specs(base, "width", [1])
    relu = ablations.sparsity_spec(base, "relu", 0.3, seeds=(0,))
    assert relu.architecture == "relu" and relu.k is None and relu.l1_coefficient == 0.3 and relu.seeds == (0,)


def test_claims_table_checks_rows_and_orders_columns():
    rows = [{"ours": "0.3", "claim": "c", "holds": True, "paper": "0.4", "scorer": "rule"}]
    frame = claims.table(rows)
    assert list(frame.columns) == ["claim", "paper", "ours", "holds", "scorer"]
    with pytest.raises(ValueError, match=r"missing \['holds'\]"):
        claims.table([{"claim": "c", "ours": "x"}])
    with pytest.raises(ValueError, match="bool or a phrase"):
        claims.table([{"claim": "c", "ours": "x", "holds": None}])


def _planted_overlap(rng: np.random.Generator, mu: float, tau: float, n_seeds: int = 4, n_latents: int = 1024):
    """An Overlap whose seed pairs share latents at mu + u_i + u_j (seed effects u ~ N(0, tau))."""
    import itertools

    from replication import stats

    u = rng.normal(0.0, tau, n_seeds)
    pairs = list(itertools.combinations(range(n_seeds), 2))
    masks = rng.random((len(pairs), n_latents)) < np.clip([mu + u[i] + u[j] for i, j in pairs], 0.01, 0.99)[:, None]
    idx = rng.integers(0, n_latents, size=(500, n_latents))
    return ablations.Overlap(
        n_seeds=n_seeds, n_latents=n_latents, threshold=0.7, per_pair={"threshold": masks.mean(1)},
        draws={"threshold": masks.mean(0)[idx].mean(1)}, mean_matched_cos={"dec": 0.0, "enc": 0.0},
        mean_max_cos={"dec": 0.0, "enc": 0.0},
        seed_level={"threshold": stats.seed_bootstrap(masks.astype(float), pairs, n_seeds, n_boot=500, return_draws=True)})


def test_verdicts_read_the_seed_level_interval():
    """Two families 0.05 apart whose seeds differ: the latent-only interval calls the difference resolved,
    the seed-level one (what verdicts read) does not."""
    rng = np.random.default_rng(3)
    a, b = _planted_overlap(rng, 0.35, 0.08), _planted_overlap(rng, 0.40, 0.08)
    effect = ablations.compare_overlaps(a, b)
    lo, hi = effect["ci95"]
    lo_s, hi_s = effect["ci95_seed"]
    assert lo > 0 and lo_s < 0 < hi_s and (hi_s - lo_s) > 3 * (hi - lo)
    assert claims.effect_row("b shares more", "higher", effect, +1)["holds"].startswith("not resolved")


def test_tested_verdict_needs_the_p_value_not_only_the_sign() -> None:
    """`claims.tested_verdict`: a positive estimate is "yes" only at p < alpha; the other sign at p < alpha is
    "opposite"; a missing or NaN estimate is "not testable". On a null (two samples of one distribution,
    permutation-tested), it says "yes" at most 10 times in 200 (2.5% expected: one side of a 5% test), while the
    sign alone says so about half the time."""
    from replication import stats

    assert claims.tested_verdict(0.2, 0.01) == "yes"
    assert claims.tested_verdict(-0.2, 0.01) == "opposite"
    assert claims.tested_verdict(-0.2, 0.01, expected_sign=-1) == "yes"
    assert claims.tested_verdict(0.2, 0.2) == "not resolved (p = 0.200)"
    assert claims.tested_verdict(float("nan"), 0.01).startswith("not testable")
    assert claims.tested_verdict(None, None).startswith("not testable")
    with pytest.raises(ValueError, match="expected_sign"):
        claims.tested_verdict(0.1, 0.01, expected_sign=0)
    rng = np.random.default_rng(0)
    tests = [stats.permutation_test(rng.lognormal(size=60), rng.lognormal(size=60), n_perm=200, stat="median", seed=s)
             for s in range(200)]
    assert sum(claims.tested_verdict(t["observed"], t["p_value"]) == "yes" for t in tests) <= 10
    assert sum(t["observed"] > 0 for t in tests) >= 60


def test_interval_verdict_reads_the_interval_and_the_sign() -> None:
    """`claims.interval_verdict` (effect_row and the live-only gain use it): "yes" only when the interval
    excludes 0 on the expected side."""
    assert claims.interval_verdict(0.1, 0.02, 0.2) == "yes"
    assert claims.interval_verdict(0.1, 0.02, 0.2, expected_sign=-1) == "opposite"
    assert claims.interval_verdict(-0.1, -0.2, -0.02) == "opposite"
    assert claims.interval_verdict(0.1, -0.01, 0.2) == "not resolved (interval includes 0)"
    with pytest.raises(ValueError, match="expected_sign"):
        claims.interval_verdict(0.1, 0.02, 0.2, expected_sign=0)
