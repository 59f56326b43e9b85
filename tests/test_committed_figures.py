"""The committed default-profile figure JSONs (figures/*.json): the keys the issues ask for are there, and their
numbers agree with independent recomputations from the same JSON (means of the per-pair values, intervals that
contain their estimates, verdicts that follow from the signs of their intervals). These read what a default run
wrote; they do not rerun it."""
from __future__ import annotations

import numpy as np
import pytest

from replication import paths
from replication.io import read_json


def committed(name: str) -> dict:
    """The committed JSON in the repository's figures/ (not REPLICATION_FIGURES_DIR, which a user may redirect)."""
    path = paths.PROJECT_ROOT / "figures" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{name}.json is not committed")
    return read_json(path)


def test_two_views_json_has_every_architecture_checkpoint_with_both_views_and_the_baselines() -> None:
    d = committed("17_consistency_views")
    n, params = d["numbers"], d["params"]
    assert set(params["resolved_dtypes"]) == {"model", "select"}
    target, tol = n["l0_matching"]["target_l0"], n["l0_matching"]["tolerance"]
    assert set(n["architectures"]) == {"topk", "batchtopk", "jumprelu", "relu", "gated"}
    for arch, a in n["architectures"].items():
        tokens = [c["tokens"] for c in a["checkpoints"]]
        budget = params["arch_n_tokens"] or params["family_spec"]["n_tokens"]
        assert tokens == sorted(tokens) and len(tokens) >= 4 and tokens[-1] == budget
        assert np.all(np.diff(np.log(tokens)) > 0.5)          # log-spaced
        for c in a["checkpoints"]:
            assert c["n_seeds"] >= 4
            lo, hi = c["pw_mcc"]["ci95_seed"]
            assert lo <= c["pw_mcc"]["estimate"] <= hi
            for view in ("threshold", "decoder"):
                s = c["shared_fraction"][view]
                assert len(s["per_pair"]) == c["n_seeds"] * (c["n_seeds"] - 1) // 2
                assert s["mean"] == pytest.approx(np.mean(s["per_pair"]))
                assert s["ci95_seed"][0] <= s["mean"] <= s["ci95_seed"][1]
            assert c["fvu"] == pytest.approx(np.mean(c["fvu_per_seed"])) and c["l0"] == pytest.approx(np.mean(c["l0_per_seed"]))
        final_l0 = a["checkpoints"][-1]["l0"]
        assert a["l0_within_tolerance"] == (abs(final_l0 / target - 1) <= tol)
        floor = n["baselines"]["untrained"][arch]
        assert floor["ci95_seed"][0] <= floor["estimate"] <= floor["ci95_seed"][1]
    assert n["baselines"]["random_model"], "the random-model baseline is missing"
    for arch, b in n["baselines"]["random_model"].items():
        assert b["ci95_seed"][0] <= b["estimate"] <= b["ci95_seed"][1]


def test_two_views_verdicts_follow_from_the_seed_level_intervals() -> None:
    """Each pair's "agrees"/"unresolved" is recomputed from the signs of its seed-level intervals."""
    n = committed("17_consistency_views")["numbers"]
    for pair, p in n["agreement"]["pairs"].items():
        sign = {}
        for view, diff in p["differences"].items():
            lo, hi = diff["ci95_seed"]
            assert lo <= diff["difference"] <= hi
            sign[view] = 0 if lo <= 0 <= hi else int(np.sign(diff["difference"]))
            assert diff["excludes_zero"] == (sign[view] != 0)
        for view in ("threshold", "decoder"):
            expected = ("unresolved" if 0 in (sign["pw_mcc"], sign[view])
                        else "agrees" if sign["pw_mcc"] == sign[view] else "disagrees")
            assert p["vs_pw_mcc"][view] == expected, (pair, view)


@pytest.mark.parametrize("name", ["06_fig4_size_k_tokens", "07_fig5_layer_model_arch"])
def test_every_committed_ablation_point_has_four_seeds_and_a_seed_level_interval(name: str) -> None:
    """Issue #17: at least 4 seeds (6 pairs) per ablation point, each with its hierarchical-bootstrap interval,
    its own schedule, and PW-MCC above the untrained floor of its shape."""
    n = committed(name)["numbers"]
    for axis, sweep in n["sweeps"].items():
        for value, p in zip(sweep["values"], sweep["points"]):
            assert p["n_seeds"] >= 4 and p["n_pairs"] == p["n_seeds"] * (p["n_seeds"] - 1) // 2, (axis, value)
            for d in ("threshold", "decoder"):
                s = p["shared"][d]
                assert s["mean"] == pytest.approx(np.mean(s["per_pair"]))
                assert s["ci95_seed"][0] <= s["mean"] <= s["ci95_seed"][1]
                # seeds and latents resampled: not narrower than the latent-only interval (10% slack for the
                # Monte Carlo error of two bootstraps; a latent-only interval passed off as seed-level fails this
                # wherever seeds differ)
                assert s["ci95_seed"][1] - s["ci95_seed"][0] >= 0.9 * (s["ci95"][1] - s["ci95"][0]) - 1e-9, (axis, value, d)
            assert p["pw_mcc"]["estimate"] == pytest.approx(p["mean_matched_cos"]["dec"], abs=1e-6)
            assert p["pw_mcc"]["estimate"] > p["pw_mcc_untrained"]["estimate"]
            assert p["schedule_tokens"] > 0
    if name == "06_fig4_size_k_tokens":   # the tokens panel: separate runs, each with its own full schedule
        tokens = n["sweeps"]["tokens"]
        assert [p["schedule_tokens"] for p in tokens["points"]] == tokens["values"]


def test_committed_fig1_and_fig2_verdicts_rest_on_calibrated_statistics() -> None:
    dip = committed("01_fig1_bimodal_cosine")["numbers"]["bimodality"]["dip_test"]
    assert 0.0 <= dip["p_value"] <= 1.0 and dip["dip"] > 0
    n2 = committed("02_fig2_kseed_decay")["numbers"]
    lo, hi = n2["offset_ci95"]
    assert lo <= hi


def test_every_committed_figure_names_its_resolved_dtypes() -> None:
    """Issue #15: each figure JSON says which dtypes `auto` (or a forced choice) resolved to, so a reader knows which
    path produced it (`params.resolved_dtypes` = {"model": ..., "select": ...})."""
    names = sorted((paths.PROJECT_ROOT / "figures").glob("[0-9][0-9]_*.json"))
    assert len(names) >= 18, names
    for p in names:
        resolved = read_json(p)["params"].get("resolved_dtypes")
        assert isinstance(resolved, dict) and set(resolved) == {"model", "select"}, (p.name, resolved)
        assert set(resolved.values()) <= {"float32", "bfloat16", "float16"}, (p.name, resolved)


def test_companion_budgets_json_reads_every_verdict_off_its_seed_level_interval() -> None:
    """Notebook 18 (issue #17, item 5): the companion claims at every budget of notebook 16, with seed-level
    intervals, the random-model AUC at its twins' budgets, and verdicts recomputed from the intervals."""
    d = committed("18_companion_budgets")
    n, params = d["numbers"], d["params"]
    assert [p["budget"] for p in n["points"]] == sorted(params["budgets"]) and len(params["budget_seeds"]) >= 4
    rows = {r["claim"]: r["holds"] for r in n["comparison"]}
    for p in n["points"]:
        b = f"{p['budget']:,} tokens"
        lo, hi = p["stable_fraction"]["ci95_seed"]
        assert lo <= p["stable_fraction"]["estimate"] <= hi
        assert rows[f"almost no latents stable at {params['stable_at']} ({b})"] == (
            "yes" if hi < 0.05 else "no" if lo >= 0.05 else "not resolved")
        lo, hi = p["frequency_relation"]["spearman"]["ci95_seed"]
        assert rows[f"unstable latents fire less ({b})"] == (
            "yes" if lo > 0 else "no: they fire more" if hi < 0 else "not resolved")
        if p["budget"] in params["random_budgets"]:
            a = p["random_model_auc"]
            lo, hi = a["ci95_seed"]
            m = params["auc_margin"]
            assert a["per_base"] and a["estimate"] == pytest.approx(np.mean(a["per_base"]))
            assert rows[f"per-latent stability separates the real from the random model ({b})"] == (
                "yes" if lo > 0.5 + m or hi < 0.5 - m else "no" if 0.5 - m < lo and hi < 0.5 + m else "not resolved")
