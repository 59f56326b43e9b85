"""Invariants of Figure 6 / Table 1's smoke JSON (written by notebook 08 under `make nbval`).

Fails (never skips) when the smoke output is absent. These hold at any scale: scores are balanced
accuracies in [0, 1], every number names the explainer and scorer that produced it, shared
counts lie in 0..N-1, Table 1 has one row per alignment bin with the selection rule obeyed,
and the LLM sample is stratified by shared count.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import smoke_numbers

from replication import paths

NAME = "08_fig6_orphan_interpretability"
PATH = paths.FIGURES_DIR / "smoke" / f"{NAME}.json"

@pytest.fixture(scope="module")
def payload() -> dict:
    smoke_numbers(NAME)   # fails with a clear message when `make nbval` has not written it
    return json.loads(PATH.read_text())


@pytest.fixture(scope="module")
def family() -> dict:
    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / "family" / "smoke.yaml").read_text())


def finite(xs) -> np.ndarray:
    arr = np.array([x for x in xs if x is not None], dtype=float)
    return arr[np.isfinite(arr)]


def test_pipelines_are_named(payload):
    pipes = payload["numbers"]["pipelines"]
    assert pipes["lexical"]["explainer"]["name"] == "lexical" and pipes["lexical"]["scorer"]["name"] == "rule"
    if payload["numbers"]["llm"] is not None:
        llm = pipes["llm"]
        assert llm["explainer_name"].startswith("llm[") and llm["scorer_name"].startswith("detection[")
        assert llm["seconds"] > 0 and llm["latents"] >= 1


def test_lexical_scores_cover_both_seeds(payload, family):
    n = payload["numbers"]
    scores = n["lexical_scores"]
    assert len(scores["latent"]) == 2 * family["n_latents"]
    assert sorted(set(scores["seed"])) == sorted(n["seeds"])
    counts = np.array(scores["shared_count"])
    assert counts.min() >= 0 and counts.max() <= len(family["seeds"]) - 1 == n["n_other_seeds"]
    ba, auc = finite(scores["balanced_accuracy"]), finite(scores["auroc"])
    assert len(ba) == n["lexical"]["scored_latents"] > 0
    assert np.all((ba >= 0) & (ba <= 1)) and np.all((auc >= 0) & (auc <= 1))


def test_spearman_equals_scipy_on_the_scored_latents(payload):
    """The shared-count vs score rho, recomputed with scipy.stats.spearmanr from the per-latent scores."""
    from scipy.stats import spearmanr

    scores = payload["numbers"]["lexical_scores"]
    ba = np.array([np.nan if v is None else v for v in scores["balanced_accuracy"]], float)
    ok = np.isfinite(ba)
    rho = spearmanr(np.asarray(scores["shared_count"])[ok], ba[ok]).statistic
    got = payload["numbers"]["lexical"]["spearman_shared_count_vs_score"]
    assert got["n"] == int(ok.sum()) and got["rho"] == pytest.approx(rho, abs=1e-12)


def test_summary_numbers_consistent(payload):
    for key in ("lexical", "llm"):
        s = payload["numbers"][key]
        if s is None:
            continue
        assert s["q25"] <= s["q75"] and 0 <= s["mean"] <= 1
        by = s["by_shared_count"]
        assert sum(r["latents"] for r in by) == s["scored_latents"]
        assert all(0 <= r["frac_ge_0.8"] <= 1 for r in by)
        rho = s["spearman_shared_count_vs_score"]
        assert rho["rho"] is None or math.isnan(rho["rho"]) or -1 <= rho["rho"] <= 1


def test_table1_selection(payload):
    table = payload["numbers"]["table1_lexical"]
    assert [r["bin"] for r in table] == ["[0.0, 0.2)", "[0.2, 0.4)", "[0.4, 0.6)", "[0.6, 0.8)", "[0.8, 1.0)"]
    for r in table:
        if r["alignment"] is None or math.isnan(r["alignment"]):
            continue
        lo = float(r["bin"][1:4])
        assert lo <= r["alignment"] <= lo + 0.2 + 1e-9
        assert 0 <= r["score_1"] <= 1 and 0 <= r["score_2"] <= 1
        assert isinstance(r["explanation_1"], str) and isinstance(r["explanation_2"], str)


def test_llm_scores_in_range_and_sample_stratified(payload):
    n = payload["numbers"]
    rows = n["llm_scores"]
    if payload["params"]["llm_pipeline"] in (None, "none"):
        assert not rows and n["llm"] is None, "no LLM pipeline was asked for, yet LLM scores were written"
        return
    assert rows, f"llm_pipeline {payload['params']['llm_pipeline']!r} was asked for but wrote no scores"
    for r in rows:
        if r["balanced_accuracy"] is not None and not math.isnan(r["balanced_accuracy"]):
            assert 0 <= r["balanced_accuracy"] <= 1 and 0 <= r["auroc"] <= 1
            assert isinstance(r["explanation"], str) and r["explanation"]
    seed_a = [r for r in rows if r["seed"] == n["seeds"][0]]
    assert sorted(r["latent"] for r in seed_a) == sorted(n["llm_sample"])
    per_count = np.bincount([r["shared_count"] for r in seed_a])
    assert per_count.max() <= max(1, payload["params"]["llm_per_count"])


def test_low_alignment_score_gap_is_the_difference_of_the_recorded_means_and_its_verdict_follows_p(payload):
    """The gap behind "low-alignment pairs: scores differ" is the two recorded mean |Δscore| subtracted, and
    "yes" needs p < 0.05 (never a bare comparison of the means)."""
    for tag in ("lexical", "llm"):
        n = payload["numbers"].get(tag)
        if not n:
            continue
        g = n["score_gap_low_vs_high_alignment"]
        if g["gap"] is None:
            assert g["verdict"].startswith("not testable")
            continue
        low, high = n["mean_abs_score_diff_low_alignment"], n["mean_abs_score_diff_high_alignment"]
        assert g["gap"] == pytest.approx(low - high, abs=1e-9)
        assert g["n_low"] + g["n_high"] == n["pairs_scored"]
        assert (g["verdict"] == "yes") == (g["gap"] > 0 and g["p_value"] < 0.05)
