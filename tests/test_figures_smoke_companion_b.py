"""Invariants of the smoke-profile JSONs of notebooks 12-15 (random-model control, subspaces,
synthetic ground truth, pooling), which `make nbval` (or `make figures PROFILE=smoke`) writes;
a missing JSON fails the test."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import smoke_numbers

PROFILE = "smoke"


numbers = smoke_numbers


def test_random_model_control():
    n = numbers("12_random_model_control")
    for name in ("real", "random"):
        s = n[name]
        assert all(0.0 <= v <= 1.0 for v in s["pair_shared_fraction"])
        assert s["mean_shared_fraction"] == pytest.approx(np.mean(s["pair_shared_fraction"]))
        curve = list(s["kseed_curve"].values())
        assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))
        assert 0.0 <= s["shared_with_all"] <= 1.0 - s["shared_with_none"] + 1e-12
    assert n["family_random"]["spec"]["random_model"] is True and n["family_real"]["spec"]["random_model"] is False
    assert 0.0 <= n["separation"]["latent_stability_auc"] <= 1.0
    assert 0.0 < n["separation"]["pair_fraction_p_value"] <= 1.0
    assert n["cross_model_shared_fraction"] < 0.1, "SAEs of the real and the random model must share ~nothing"
    # PW-MCC of the real family, whose random-model floor is this notebook's own random family
    pw = n["pw_mcc"]
    assert pw["ci95_seed"][0] <= pw["estimate"] <= pw["ci95_seed"][1]
    assert pw["baselines"]["random_model"]["seeds"] == n["family_random"]["spec"]["seeds"]
    assert pw["baselines"]["random_model"]["fvu"] == pytest.approx(n["family_random"]["mean_fvu"])


def test_reproducible_subspaces():
    from replication.plotting import load_figure_json

    n = numbers("13_reproducible_subspaces")
    params = load_figure_json("13_reproducible_subspaces", "smoke")["params"]
    rows = n["table"]
    for row in rows:
        # nothing captures more than the seed's own top-r subspace (Eckart-Young)
        for key in ("cross_seed", "random", "data_pca", "stable_subspace"):
            assert 0.0 <= row[key] <= row["within"] + 1e-9, (key, row)
        # A uniformly random rank-r projection P captures E tr(PA) = r/d of any energy matrix A (tr A = 1), with
        # Var = 2r(d-r) / ((d-1) d (d+2)) * (tr(A^2) - 1/d) <= 2r(d-r) / ((d-1) d (d+2)) * lambda_1, and lambda_1
        # is at most what the top subspace of the smallest rank captures ("within"). The JSON averages n_random
        # draws: it must sit within 5 standard deviations of r/d (a tolerance well below the value itself).
        d, r, lam1 = n["family"]["d_in"], row["rank"], rows[0]["within"]
        sd = math.sqrt(2 * r * (d - r) / ((d - 1) * d * (d + 2)) * lam1 / params["n_random"])
        assert row["rank_fraction"] == pytest.approx(r / d)
        assert abs(row["random"] - r / d) <= 5 * sd < row["rank_fraction"], (row, sd)
    within = [r["within"] for r in rows]
    assert all(a <= b + 1e-12 for a, b in zip(within, within[1:])), "captured energy grows with the rank"
    cross = np.array(n["cross_matrix_main_rank"], dtype=float)
    assert np.isnan(np.diag(cross)).all() and np.nanmax(cross) <= 1.0


def test_synthetic_ground_truth():
    n = numbers("14_synthetic_ground_truth")
    for key in ("separated_recovered_fraction", "group_subspace_recovered_fraction", "group_basis_recovered_fraction",
                "separated_reproduced_across_seeds", "group_latents_reproduced_across_seeds"):
        assert 0.0 <= n[key] <= 1.0
    assert n["separated_recovered_in_all_seeds"] <= n["separated_recovered_fraction"] + 1e-12
    assert all(r["fvu"] < 0.2 for r in n["training"]), "the synthetic SAEs did not train"
    assert n["separated_recovered_fraction"] > 0.8


def test_pooling():
    n = numbers("15_pooling")
    variants = n["variants"]
    assert {"single seed", "single seed + fine-tune"} <= set(variants)
    assert not set(n["build_seeds"]) & set(n["eval_seeds"])
    for name, v in variants.items():
        assert 0.0 <= v["shared_with_all"] <= v["mean_shared_fraction"] <= v["shared_with_any"] <= 1.0, name
        assert 0.0 < v["fvu"] < 1.5, name
        assert v["pw_mcc"] == pytest.approx(np.mean(v["pw_mcc_per_other"])) and len(v["pw_mcc_per_other"]) == len(n["eval_seeds"])
    for fill, info in n["built"].items():
        assert info["from_pool"] + info["filled"] == n["family"]["spec"]["n_latents"]
        assert sum(info["per_source_seed"]) == info["from_pool"] <= n["pool_size"]


def test_companion_claims_at_budgets():
    """Notebook 18: one point per notebook-16 budget, intervals that contain their estimates, the random-model AUC
    where a twin was asked for, and verdicts that follow from the intervals (recomputed here)."""
    from replication.plotting import load_figure_json
    j = load_figure_json("18_companion_budgets", PROFILE)
    n, params = j["numbers"], j["params"]
    assert [p["budget"] for p in n["points"]] == sorted(params["budgets"])
    assert set(params["resolved_dtypes"]) == {"model", "select"}
    for p in n["points"]:
        s, r = p["stable_fraction"], p["frequency_relation"]["spearman"]
        assert s["ci95_seed"][0] <= s["estimate"] <= s["ci95_seed"][1]
        assert s["estimate"] == pytest.approx(np.mean(s["per_pair"]))
        assert r["estimate"] == pytest.approx(np.mean(r["per_base"])) and r["n_bases"] == len(params["budget_seeds"])
        assert ("random_model_auc" in p) == (p["budget"] in params["random_budgets"])
    rows = n["comparison"]
    assert len(rows) == 2 * len(n["points"]) + len(params["random_budgets"])
    for p in n["points"]:
        lo, hi = p["frequency_relation"]["spearman"]["ci95_seed"]
        row = next(r for r in rows if r["claim"] == f"unstable latents fire less ({p['budget']:,} tokens)")
        assert row["holds"] == ("yes" if lo > 0 else "no: they fire more" if hi < 0 else "not resolved")
