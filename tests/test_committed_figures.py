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
        assert tokens == sorted(tokens) and len(tokens) >= 4 and tokens[-1] == (params["arch_n_tokens"] or params["family_spec"]["n_tokens"])
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
