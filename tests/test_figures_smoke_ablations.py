"""Invariants of the smoke-profile JSONs of the ablation notebooks 06 (size, k, tokens) and
07 (layer, model and position, architecture), which `make nbval` writes; a missing JSON fails."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import smoke_numbers

from replication import paths
from replication.plotting import load_figure_json


def params(name: str) -> dict:
    return load_figure_json(name, "smoke")["params"]


def declared(name: str) -> dict:
    """The notebook's smoke parameters as the YAML file declares them."""
    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / name / "smoke.yaml").read_text())


def check_points(points: list[dict]) -> None:
    for p in points:
        for d, s in p["shared"].items():
            assert 0.0 <= s["mean"] <= 1.0, d
            assert all(0.0 <= v <= 1.0 for v in s["per_pair"])
            assert s["mean"] == pytest.approx(np.mean(s["per_pair"]))
            lo, hi = s["ci95"]
            assert 0.0 <= lo <= hi <= 1.0
        assert p["shared"]["agree"]["mean"] <= p["shared"]["threshold"]["mean"] + 1e-12
        assert p["shared"]["threshold"]["mean"] <= p["shared"]["decoder"]["mean"] + 1e-12
        for part in ("dec", "enc"):
            assert p["mean_max_cos"][part] >= p["mean_matched_cos"][part] - 1e-6
        assert p["n_pairs"] == p["n_seeds"] * (p["n_seeds"] - 1) // 2 and p["n_seeds"] >= 2
        # seed-level intervals (seeds, then latents) and Song et al.'s PW-MCC on every point
        for d, s in p["shared"].items():
            lo, hi = s["ci95_seed"]
            assert 0.0 <= lo <= hi <= 1.0, d
        assert p["pw_mcc"]["estimate"] == pytest.approx(p["mean_matched_cos"]["dec"], abs=1e-6)
        lo, hi = p["pw_mcc"]["ci95_seed"]
        assert lo <= p["pw_mcc"]["estimate"] + 1e-9 and p["pw_mcc"]["estimate"] <= hi + 1e-9
        # and its floor: untrained SAEs of the point's shape and seeds
        floor = p["pw_mcc_untrained"]
        assert 0.0 < floor["estimate"] < 1.0 and floor["ci95_seed"][0] <= floor["estimate"] <= floor["ci95_seed"][1]


def test_fig4_sweep_axes_as_declared():
    name = "06_fig4_size_k_tokens"
    n, want = smoke_numbers(name), declared(name)
    sweeps = n["sweeps"]
    assert sweeps["n_latents"]["values"] == want["size_values"] and len(want["size_values"]) >= 5
    assert sweeps["k"]["values"] == want["k_values"] and len(want["k_values"]) >= 4
    # the tokens panel: separate runs, each with its own full schedule ending at its budget (no checkpoints)
    tokens = sweeps["tokens"]["values"]
    assert tokens == want["token_budgets"] and len(tokens) >= 4 and tokens == sorted(tokens)
    assert [p["schedule_tokens"] for p in sweeps["tokens"]["points"]] == tokens
    # the size sweep at its second budget: same sizes, every point on that budget's schedule
    second = sweeps["n_latents_second_budget"]
    assert second["values"] == want["size_values"] and second["n_tokens"] == want["size_second_n_tokens"]
    assert {p["schedule_tokens"] for p in second["points"]} == {want["size_second_n_tokens"]}
    for size, change in n["size_change_with_budget"].items():
        a, b = (next(p for p in sweeps[ax]["points"] if p["n_latents"] == int(size))
                for ax in ("n_latents_second_budget", "n_latents"))
        assert change["difference"] == pytest.approx(b["shared"]["threshold"]["mean"] - a["shared"]["threshold"]["mean"])
    for axis, sweep in sweeps.items():
        assert len(sweep["points"]) == len(sweep["values"]), axis
        check_points(sweep["points"])
    for p, size in zip(sweeps["n_latents"]["points"], want["size_values"]):
        assert p["n_latents"] == size and p["n_seeds"] == len(want["sweep_seeds"])
    # each trend's means and first-to-last difference come from the sweep's own points, and each verdict
    # follows from its interval (holds = interval excludes 0 on the paper's side)
    rows = {row["claim"]: row["holds"] for row in n["comparison"]}
    for axis, claim, sign in (("n_latents", "more latents share less", -1), ("k", "larger k shares less", -1),
                              ("tokens", "longer training shares more", +1)):
        t = n["trends"][axis]["threshold"]
        means = [pt["shared"]["threshold"]["mean"] for pt in sweeps[axis]["points"]]
        assert t["means"] == pytest.approx(means) and t["values"] == sweeps[axis]["values"]
        diff, (lo, hi) = t["first_to_last"]["difference"], t["first_to_last"]["ci95_seed"]   # verdicts read the seed-level one
        assert diff == pytest.approx(means[-1] - means[0], abs=1e-12) and lo <= diff <= hi
        resolved = lo > 0 or hi < 0
        expected = ("yes" if np.sign(diff) == sign else "opposite") if resolved else "not resolved (interval includes 0)"
        assert rows[claim] == expected, claim


def test_fig5_axes_and_matched_sparsity():
    name = "07_fig5_layer_model_arch"
    n, want, p = smoke_numbers(name), declared(name), params(name)
    sweeps = n["sweeps"]
    assert sweeps["layer"]["values"] == want["layers"] and len(want["layers"]) >= 6
    assert min(want["layers"]) == 0 and max(want["layers"]) == 29   # first and last layer of SmolLM2-135M
    sites = sweeps["site"]["values"]
    assert len(sites) == 4 and sum("mlp_out" in s for s in sites) == 2 and sum("resid_post" in s for s in sites) == 2
    assert any(p["second_model"] in s for s in sites)
    site_points = sweeps["site"]["points"]
    # the same expansion factor: n_latents / d_model equal for both models (d_model 576 and 640)
    ratios = {round(pt["n_latents"] / d, 6) for pt, d in zip(site_points, [576, 576, 640, 640])}
    assert ratios == {p["expansion"]}
    assert sweeps["architecture"]["values"] == ["topk", *want.get("arch_architectures", p["arch_architectures"])]
    for sweep in sweeps.values():
        check_points(sweep["points"])
    match = n["sparsity_matching"]
    l0 = match["family_l0"]
    for arch in p["arch_architectures"]:
        assert match["calibration"][arch]["within_tolerance"], arch
        assert abs(l0[arch] / l0["topk"] - 1) <= match["tolerance"], f"{arch} L0 {l0[arch]} vs topk {l0['topk']}"
    assert match["tolerance"] <= 0.1
    # the architecture panel and the layer/position panels train for a declared budget, each with its own schedule
    from replication.studies import consistency  # the architecture families' settings live in notebook 17's params

    arch_tokens = (want.get("arch_n_tokens") or consistency.shared_architecture_settings("smoke")["arch_n_tokens"]
                   or p["family_spec"]["n_tokens"])
    assert p["arch_n_tokens_resolved"] == arch_tokens
    assert {pt["schedule_tokens"] for pt in sweeps["architecture"]["points"]} == {arch_tokens}
    layer_tokens = want.get("ablation_n_tokens") or p["family_spec"]["n_tokens"]
    assert {pt["schedule_tokens"] for pt in sweeps["layer"]["points"] + site_points} == {layer_tokens}
