"""Notebooks 16 (convergence) and 17 (two views of stability): their smoke JSONs against independent computations."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml
from conftest import smoke_numbers

from replication import paths
from replication.plotting import load_figure_json


def declared(name: str) -> dict:
    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / name / "smoke.yaml").read_text())


def test_convergence_json_has_every_budget_with_intervals_and_fits():
    name = "16_convergence"
    n, want = smoke_numbers(name), declared(name)
    family = yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / "family" / "smoke.yaml").read_text())
    sizes = {family["n_latents"]: want["budgets"], want["small_n_latents"]: want["small_budgets"]}
    for size, budgets in sizes.items():
        points = sorted((p for p in n["points"] if p["n_latents"] == size), key=lambda p: p["budget"])
        assert [p["budget"] for p in points] == sorted(budgets)
        for p in points:
            assert p["schedule_tokens"] == p["budget"] and p["n_seeds"] == len(want["budget_seeds"])
            assert p["passes_over_cache"] == pytest.approx(p["budget"] / family["n_train_tokens"])
            lo, hi = p["fvu"]["ci95_seed"]
            assert lo <= p["fvu"]["mean"] <= hi and p["fvu"]["mean"] == pytest.approx(np.mean(p["fvu"]["per_seed"]))
            for d in ("threshold", "agree", "decoder"):
                s = p["shared"][d]
                assert s["ci95_seed"][0] <= s["mean"] + 1e-12 and s["mean"] <= s["ci95_seed"][1] + 1e-12
        # PW-MCC's floor: untrained SAEs of this shape and seeds, the same at every budget of a size
        from replication.analysis.stability import untrained_pw_mcc
        from replication.experiments import FamilySpec
        from replication.studies.ablations import d_model

        floor = untrained_pw_mcc("topk", d_model(FamilySpec.from_profile("smoke")), size, family["k"],
                                 want["budget_seeds"], n_boot=10, cache=False)["estimate"]
        assert all(p["pw_mcc_untrained"]["estimate"] == pytest.approx(floor, abs=1e-9) for p in points)
        for stat in ("threshold", "agree", "decoder", "pw_mcc", "fvu"):
            fit = n["fits"][str(size)][stat]
            assert fit["budgets"] == [p["budget"] for p in points]
            values = [p["fvu"]["mean"] if stat == "fvu" else p["pw_mcc"]["estimate"] if stat == "pw_mcc"
                      else p["shared"][stat]["mean"] for p in points]
            assert fit["estimates"] == pytest.approx(values)
            assert "identified" in fit
            if fit["identified"]:
                lo, hi = fit["plateau_ci95"]
                assert lo <= hi
    # the verdict of the core family's closeness follows from its fit
    core = n["closeness"][str(family["n_latents"])]["threshold"]
    row = next(r for r in n["comparison"] if "within" in r["claim"])
    if core["identified"]:
        assert row["holds"] is core["core_budget"]["within_tolerance"]
    else:
        assert "no plateau identified" in row["holds"]


def test_convergence_fvu_recomputed_from_the_checkpoints():
    """Each budget's mean FVU is the mean of its seeds' training.json held-out FVU (read here directly)."""
    from replication import experiments
    from replication.io import read_json

    j = load_figure_json("16_convergence", "smoke")
    base = experiments.FamilySpec.from_params(j["params"]["family_spec"])
    for p in j["numbers"]["points"]:
        spec = dataclasses.replace(base, n_latents=p["n_latents"], n_tokens=p["budget"], seeds=tuple(j["params"]["budget_seeds"]))
        root = experiments.family_dir(spec)
        fvu = [read_json(root / f"seed{s}" / spec.hook / "training.json")["metrics"]["fvu"] for s in spec.seeds]
        assert p["fvu"]["mean"] == pytest.approx(np.mean(fvu), abs=1e-12)
        assert read_json(root / f"seed{spec.seeds[0]}" / spec.hook / "training.json")["data_config"]["n_tokens"] == p["budget"]


def _unit(w) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _pw_mcc(decoders: list[np.ndarray]) -> float:
    from scipy.optimize import linear_sum_assignment

    values = []
    for i in range(len(decoders)):
        for j in range(i + 1, len(decoders)):
            cos = _unit(decoders[i]) @ _unit(decoders[j]).T
            r, c = linear_sum_assignment(cos, maximize=True)
            values.append(cos[r, c].mean())
    return float(np.mean(values))


def test_views_json_per_architecture_and_checkpoint():
    name = "17_consistency_views"
    n, want = smoke_numbers(name), declared(name)
    params = load_figure_json(name, "smoke")["params"]
    assert list(n["architectures"]) == params["architectures"] and len(params["architectures"]) == 5
    target = n["l0_matching"]["target_l0"]
    for arch, v in n["architectures"].items():
        tokens = [c["tokens"] for c in v["checkpoints"]]
        assert tokens == sorted(tokens) and tokens[-1] == params["arch_n_tokens"] and len(tokens) >= 3
        for c in v["checkpoints"]:
            lo, hi = c["pw_mcc"]["ci95_seed"]
            assert lo <= c["pw_mcc"]["estimate"] <= hi
            for d in ("threshold", "decoder"):
                assert c["shared_fraction"][d]["ci95_seed"][0] <= c["shared_fraction"][d]["mean"] + 1e-12
            assert 0 < c["fvu"] and c["l0"] >= 0 and c["n_seeds"] == len(want["arch_seeds"])
        assert v["l0_within_tolerance"] is bool(abs(v["checkpoints"][-1]["l0"] / target - 1) <= params["l0_tolerance"])
        assert n["baselines"]["untrained"][arch]["estimate"] < 1
    assert set(n["baselines"]["random_model"]) == set(params["random_model_architectures"])
    # an architecture that missed the L0 target is reported, never scored
    for row in n["comparison"]:
        for arch, v in n["architectures"].items():
            if f"than {arch}" in row["claim"] or row["claim"].startswith(f"Paulo & Belrose: {arch} "):
                assert ("not scored" in str(row["holds"])) is (not v["l0_within_tolerance"]), row


def test_views_pw_mcc_and_untrained_floor_recomputed_with_scipy():
    """The final PW-MCC of each architecture, and the untrained floor, recomputed from the checkpoints (and from
    freshly built SAEs) with scipy's Hungarian solver: the package's solver is not used."""
    from replication import experiments
    from replication.sae.architectures import build_sae
    from replication.sae.checkpoints import load_directions

    j = load_figure_json("17_consistency_views", "smoke")
    n, params = j["numbers"], j["params"]
    base = experiments.FamilySpec.from_params(params["family_spec"])
    for arch, v in n["architectures"].items():
        s = v["spec"]
        spec = dataclasses.replace(base, architecture=arch, k=s["k"], l1_coefficient=s["l1_coefficient"] or base.l1_coefficient)
        root = experiments.family_dir(spec)
        decoders = [load_directions(root / f"seed{seed}" / spec.hook).decoder for seed in spec.seeds]
        assert v["checkpoints"][-1]["pw_mcc"]["estimate"] == pytest.approx(_pw_mcc(decoders), abs=1e-5), arch
        untrained = [build_sae(arch, params["d_in"], spec.n_latents, k=s["k"], seed=seed).latent_directions().decoder
                     for seed in spec.seeds]
        assert n["baselines"]["untrained"][arch]["estimate"] == pytest.approx(_pw_mcc(untrained), abs=1e-5), arch
