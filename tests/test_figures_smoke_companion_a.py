"""Invariants of the smoke-profile JSONs of notebooks 09-11 (per-latent stability, functional
asymmetry, live-only statistics), which `make nbval` (or `make figures PROFILE=smoke`) writes;
a missing JSON fails the test."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import smoke_numbers

PROFILE = "smoke"


numbers = smoke_numbers


def test_per_latent_stability():
    n = numbers("09_per_latent_stability")
    n_others, n_latents = n["n_others"], n["n_latents"]
    assert n["n_seeds"] == n_others + 1 >= 3
    p = np.array(n["p_base"])
    assert p.shape == (n_latents,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p * n_others, np.round(p * n_others), atol=1e-9)    # steps of 1 / (N - 1)
    for lo_key, hi_key in (("wilson_low", "wilson_high"), ("clopper_pearson_low", "clopper_pearson_high")):
        lo, hi = np.array(n[lo_key]), np.array(n[hi_key])
        assert np.all(lo <= p + 1e-12) and np.all(p <= hi + 1e-12) and np.all(hi - lo > 0)
    # Clopper-Pearson is the conservative one
    assert np.all(np.array(n["clopper_pearson_high"]) - np.array(n["clopper_pearson_low"])
                  >= np.array(n["wilson_high"]) - np.array(n["wilson_low"]) - 1e-9)
    for modes in (n["modes_base"], n["modes_all"]):
        fr = modes["fraction_stable"] + modes["fraction_unstable"] + modes["fraction_intermediate"]
        assert fr == pytest.approx(1.0)
        assert len(modes["histogram"]) == n_others + 1
        bics = [f["bic"] for f in modes["fits"]]
        assert modes["best_n_components"] == 1 + int(np.argmin(bics))
    assert sum(n["modes_base"]["histogram"]) == n_latents
    (agree,) = n["labelling_agreement"].values()
    assert 0 <= agree["iou_events"] <= 1 and 0 <= agree["event_agreement"] <= 1
    # max cosine labels a superset of Hungarian events: it never finds fewer stable latents
    assert n["fraction_stable_by_method"]["maxcos"] >= n["fraction_stable_by_method"]["hungarian"] - 1e-12
    assert -1 <= n["frequency_relation"]["spearman_rho"] <= 1
    assert n["family"]["spec"]["seeds"] == list(range(n["n_seeds"]))


def test_functional_asymmetry():
    n = numbers("10_functional_asymmetry")
    m = n["masks"]
    assert m["masked"]["full"]["n_latents"] == 0
    target = m["target_mass"]
    assert target == pytest.approx(m["mass_fraction"] * min(m["mass_stable"], m["mass_unstable"]))
    for name in ("stable", "unstable_mass", "random_mass"):
        assert m["masked"][name]["mass"] >= target * (1 - 1e-6)
    assert m["masked"]["unstable_count"]["n_latents"] <= m["masked"]["stable"]["n_latents"] + 1e-9
    for res in (n["fvu"], n["ce"]):
        assert res["full"]["delta"] == 0
        for r in res.values():
            assert r["low"] <= r["value"] + 1e-12 <= r["high"] + 2e-12
            assert r["delta_low"] <= r["delta"] + 1e-12 <= r["delta_high"] + 2e-12
    assert 0 < n["fvu"]["full"]["value"] < 1.5
    # removing latents cannot lower the reconstruction error much below the full code's
    assert n["fvu"]["stable"]["delta"] > 0 and n["fvu"]["unstable_mass"]["delta"] > 0
    for key in ("fvu", "ce"):
        d = n["stable_minus_unstable_mass_paired"][key]
        assert d["delta"] == pytest.approx(n[key]["stable"]["value"] - n[key]["unstable_mass"]["value"], abs=1e-9)
        assert d["delta_low"] <= d["delta"] + 1e-12 <= d["delta_high"] + 2e-12
    ce = n["ce"]
    assert ce["zero"]["value"] > ce["clean"]["value"], "zeroing the hook activation must hurt the model"
    assert np.isfinite(n["loss_recovered"])
    # seed-level numbers: one value per base SAE, their mean, and the first base's own paired difference among them
    sl = n["seed_level"]
    assert sl["n_bases"] == len(n["base_seeds"]) == len(n["per_base"]) >= 2
    for key in ("fvu", "ce"):
        d = sl[key]["stable_minus_unstable_mass"]
        assert len(d["per_base"]) == sl["n_bases"] and d["estimate"] == pytest.approx(np.mean(d["per_base"]))
        assert d["per_base"][0] == pytest.approx(n["stable_minus_unstable_mass_paired"][key]["delta"], abs=1e-9)
        assert d["ci95_seed"][0] <= d["ci95_seed"][1]
        for b, seed in enumerate(n["base_seeds"]):
            own = n["per_base"][str(seed)]["stable_minus_unstable_mass_paired"][key]["delta"]
            assert d["per_base"][b] == pytest.approx(own, abs=1e-9)


def test_live_only_statistics():
    n = numbers("11_live_only_statistics")
    s = n["summary"]
    assert s["all"]["n_pairs"] == s["live"]["n_pairs"] == n["n_seeds"] * (n["n_seeds"] - 1) // 2
    for name in ("all", "live", "random"):
        med = s[name]["median"]
        assert med["low"] <= med["estimate"] <= med["high"]
        f9, f7 = s[name]["stability_fraction"]["0.9"], s[name]["stability_fraction"]["0.7"]
        assert 0 <= f9["estimate"] <= f7["estimate"] <= 1
    assert s["random"]["stability_fraction"]["0.7"]["estimate"] == 0, "random directions of width d never match at 0.7"
    assert s["live"]["median"]["estimate"] > s["random"]["median"]["estimate"]
    assert 0 < n["permutation_pooled"]["p_value"] <= 1
    g = n["live_median_gain"]                 # per pair: the two medians the summary records, subtracted
    assert g["ci95_seed"][0] <= g["estimate"] <= g["ci95_seed"][1]
    np.testing.assert_allclose(g["per_pair"], np.subtract(s["live"]["pair_medians"], s["all"]["pair_medians"]), atol=1e-12)
    low, high = g["ci95_seed"]
    want = ("not testable: no dead latents" if n["dead_fraction"] == 0 else "yes" if low > 0
            else "opposite (the live-only median is lower)" if high < 0 else "not resolved (interval includes 0)")
    assert g["verdict"] == want



def test_live_only_all_pairs_equal_scipy_matching_of_the_checkpoints():
    """Per-pair medians of the matched decoder cosines ("all" latents), recomputed with scipy's Hungarian
    solver from the checkpoints: our certified solver and scipy agree."""
    from scipy.optimize import linear_sum_assignment

    from replication import experiments
    from replication.sae.checkpoints import load_directions

    n = numbers("11_live_only_statistics")
    spec = experiments.FamilySpec.from_params(n["family"]["spec"])
    root = experiments.family_dir(spec)
    dec = []
    for seed in spec.seeds:
        w = np.asarray(load_directions(root / f"seed{seed}" / spec.hook).decoder, np.float64)
        dec.append(w / np.linalg.norm(w, axis=1, keepdims=True))
    medians = []
    for i in range(len(dec)):
        for j in range(i + 1, len(dec)):
            cos = dec[i] @ dec[j].T
            r, c = linear_sum_assignment(cos, maximize=True)
            medians.append(np.median(cos[r, c]))
    np.testing.assert_allclose(n["summary"]["all"]["pair_medians"], medians, atol=1e-5)
