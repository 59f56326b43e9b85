"""Invariants of the figure JSONs written by the smoke profile (`make nbval` runs it first).

These hold at any scale: fractions in [0, 1], agree-shared <= threshold-shared, the k-seed
curve non-increasing, max cosine never below the Hungarian-matched cosine, and a shuffled
copy of a trained SAE 100% shared.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from conftest import smoke_numbers

from replication import experiments, paths
from replication.io import write_json_atomic

PROFILE = "smoke"
FIGURES = ["00_model_and_data", "01_fig1_bimodal_cosine", "02_fig2_kseed_decay", "03_fig3_firing_frequency",
           "04_figA1_threshold", "05_figA2_A3_hungarian_vs_maxcos"]


numbers = smoke_numbers


def family_params() -> dict:
    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / "family" / f"{PROFILE}.yaml").read_text())


def _pair_directions(figure: str):
    """Decoder and encoder unit rows of the figure's seed pair, read from the checkpoints (float64)."""
    from replication.sae.checkpoints import load_directions

    n = numbers(figure)
    spec = n["family"]["spec"]
    from replication import experiments

    root = experiments.family_dir(experiments.FamilySpec.from_params(spec))
    dirs = [load_directions(root / f"seed{s}" / spec["hook"]) for s in n["pair"]]
    unit = lambda w: np.asarray(w, np.float64) / np.linalg.norm(np.asarray(w, np.float64), axis=1, keepdims=True)
    return [(unit(d.decoder), unit(d.encoder)) for d in dirs]


def test_fig1_shared_fractions_equal_scipy_matching_of_the_checkpoints():
    """Recomputed from the checkpoints with scipy's Hungarian solver (not our certified solver) and the SPEC
    definitions written out here: every shared fraction in the JSON agrees."""
    from scipy.optimize import linear_sum_assignment

    n = numbers("01_fig1_bimodal_cosine")
    (dec_a, enc_a), (dec_b, enc_b) = _pair_directions("01_fig1_bimodal_cosine")
    cos_dec, cos_enc = dec_a @ dec_b.T, enc_a @ enc_b.T
    _, dp = linear_sum_assignment(cos_dec, maximize=True)
    _, ep = linear_sum_assignment(cos_enc, maximize=True)
    rows = np.arange(len(dp))
    dc, ec = cos_dec[rows, dp], cos_enc[rows, ep]
    t = 0.7
    expected = {"threshold": ((dc > t) & (ec > t)).mean(), "agree": ((dc > t) & (ec > t) & (dp == ep)).mean(),
                "decoder": (dc > t).mean(), "maxcos": ((cos_dec.max(1) > t) & (cos_enc.max(1) > t)).mean()}
    # float32 cosines in the pipeline vs float64 here: a latent within 1e-5 of the threshold may flip
    tol = (np.abs(dc - t) < 1e-5).mean() + (np.abs(ec - t) < 1e-5).mean() + 1e-12
    for name, value in expected.items():
        assert n["shared_fraction"][name] == pytest.approx(value, abs=tol), name


def test_model_card_numbers():
    n = numbers("00_model_and_data")
    assert 1.0 < n["loss_trained"] < n["loss_random_init"]
    assert n["corpus_tokens"]["train"] > 0 and n["corpus_tokens"]["heldout"] > 0


def test_fig1_fractions_and_definitions():
    n = numbers("01_fig1_bimodal_cosine")
    fr = n["shared_fraction"]
    assert set(fr) == {"threshold", "agree", "decoder", "maxcos"}
    assert all(0.0 <= v <= 1.0 for v in fr.values())
    assert fr["agree"] <= fr["threshold"] <= fr["decoder"]
    for name, (lo, hi) in n["shared_fraction_ci95"].items():
        assert lo <= fr[name] <= hi
    assert -1.0 <= n["mean_cos_disagree"] <= 1.0 and -1.0 <= n["mean_cos_agree"] <= 1.0
    # PW-MCC (Song et al.) of the family, its seed-level interval, and the untrained floor below it
    pw, floor = n["pw_mcc"], n["pw_mcc"]["baselines"]["untrained"]
    assert pw["ci95_seed"][0] <= pw["estimate"] <= pw["ci95_seed"][1] and pw["n_pairs"] == len(family_params()["seeds"]) * (
        len(family_params()["seeds"]) - 1) // 2
    assert 0 < floor["estimate"] < pw["estimate"]


def test_fig2_kseed_curve_is_exact_shape():
    n = numbers("02_fig2_kseed_decay")
    seeds = family_params()["seeds"]
    assert n["k"] == list(range(2, len(seeds) + 1))
    y = n["only_in_base"]
    assert all(0.0 <= v <= 1.0 for v in y)
    assert all(a >= b - 1e-12 for a, b in zip(y, y[1:])), "the only-in-base fraction cannot grow with k"
    for curve in n["curves"].values():
        vals = list(curve.values())
        assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))
    fit = n["fit_with_offset"]["params"]
    from replication.analysis.stats import power_law

    residual = np.asarray(y) - power_law(np.asarray(n["k"], float), fit["a"], fit["b"], fit["c"])
    assert np.sum(residual ** 2) == pytest.approx(n["fit_with_offset"]["rss"], rel=1e-6, abs=1e-12)


def _smoke_family(figure: str):
    from replication import experiments

    spec = experiments.FamilySpec.from_params(numbers(figure)["family"]["spec"])
    return experiments.seed_family(spec, progress=False)


def test_fig1_dip_test_matches_an_independent_computation():
    """The JSON's dip-test p-value equals diptest called directly on the matched cosines of the pair."""
    import diptest

    n = numbers("01_fig1_bimodal_cosine")
    family = _smoke_family("01_fig1_bimodal_cosine")
    i, j = (family.spec.seeds.index(s) for s in n["pair"])
    res = family.matching.result(i, j)
    mean_cos = 0.5 * (np.asarray(res.dec_cos) + np.asarray(res.enc_cos))   # in the cosines' float32, as the notebook
    dip, p_value = diptest.diptest(mean_cos.astype(np.float64))
    assert n["bimodality"]["dip_test"]["p_value"] == pytest.approx(p_value, abs=1e-9)
    assert n["bimodality"]["dip_test"]["dip"] == pytest.approx(dip, abs=1e-9)


def test_fig2_offset_interval_and_orphans_from_the_counts():
    """offset_ci95 brackets the fitted offset; the none-shared fraction equals the curve at k = N, and the
    independence baseline is (1 - mean pairwise rate)^(N-1), recomputed here from the matchings."""
    n = numbers("02_fig2_kseed_decay")
    ev = n["offset_evidence"]
    lo, hi = n["offset_ci95"]
    assert lo <= ev["offset"] <= hi
    assert ev["orphans_none_shared"] == pytest.approx(n["only_in_base"][-1], abs=1e-12)
    family = _smoke_family("02_fig2_kseed_decay")
    counts = family.matching.shared_counts(n["definition"], 0.7)
    n_seeds = counts.shape[0]
    rate = counts.mean() / (n_seeds - 1)
    assert ev["orphans_expected_if_independent"] == pytest.approx((1 - rate) ** (n_seeds - 1), abs=1e-12)
    assert ev["verdict_offset"] == (lo > 0 and ev["excess_orphans_ci95"][0] > 0)


def test_fig2_at_two_seeds_is_one_minus_the_mean_pairwise_shared_fraction():
    """Cross-figure consistency: the k-seed curve at k = 2 equals one minus the shared fraction averaged
    over all ordered seed pairs (each pair's fraction computed here from its own match)."""
    from replication import matching

    n = numbers("02_fig2_kseed_decay")
    family = _smoke_family("02_fig2_kseed_decay")
    fm = family.matching
    for definition in n["curves"]:
        fractions = [matching.shared_fractions(fm.result(i, j), 0.7)[definition]
                     for i in range(fm.n_seeds) for j in range(fm.n_seeds) if i != j]
        assert n["curves"][definition]["2"] == pytest.approx(1 - np.mean(fractions), abs=1e-12), definition


def test_fig3_groups_cover_live_latents():
    n = numbers("03_fig3_firing_frequency")
    n_other = len(family_params()["seeds"]) - 1
    groups = {int(g): v for g, v in n["groups"].items()}
    assert all(0 <= g <= n_other for g in groups)
    assert sum(v["latents"] for v in groups.values()) + n["dead_latents"] == family_params()["n_latents"]
    assert all(0.0 < v["median_frequency"] <= 1.0 for v in groups.values())


def test_figA1_sweep_monotone_and_ordered():
    n = numbers("04_figA1_threshold")
    assert len(n["thresholds"]) == 50 and n["thresholds"][0] == 0.0 and n["thresholds"][-1] == 1.0
    curves = {k: np.asarray(v) for k, v in n["shared_vs_threshold"].items()}
    for name, curve in curves.items():
        assert np.all((curve >= 0) & (curve <= 1)), name
        assert np.all(np.diff(curve) <= 1e-12), f"{name} must not increase with the threshold"
    assert np.all(curves["agree"] <= curves["threshold"] + 1e-12)
    assert np.all(curves["threshold"] <= curves["decoder"] + 1e-12)


def test_figA2_matched_and_max_cosines_from_the_checkpoints():
    """Mean Hungarian-matched and mean row-max cosines over every ordered seed pair, recomputed with scipy
    from the checkpoints (a bijection's inverse has the same matched cosines, so unordered pairs suffice
    for the matched mean; the row maxima differ by direction)."""
    from scipy.optimize import linear_sum_assignment

    from replication import experiments
    from replication.sae.checkpoints import load_directions

    n = numbers("05_figA2_A3_hungarian_vs_maxcos")
    spec = experiments.FamilySpec.from_params(n["family"]["spec"])
    root = experiments.family_dir(spec)
    unit = lambda w: np.asarray(w, np.float64) / np.linalg.norm(np.asarray(w, np.float64), axis=1, keepdims=True)
    dirs = [load_directions(root / f"seed{s}" / spec.hook) for s in spec.seeds]
    for side, attr in (("dec", "decoder"), ("enc", "encoder")):
        rows = [unit(getattr(d, attr)) for d in dirs]
        matched, maxima = [], []
        for i in range(len(rows)):
            for j in range(len(rows)):
                if i != j:
                    cos = rows[i] @ rows[j].T
                    r, c = linear_sum_assignment(cos, maximize=True)
                    matched.append(cos[r, c].mean())
                    maxima.append(cos.max(1).mean())
        assert n["mean_matched_cos"][side] == pytest.approx(np.mean(matched), abs=1e-5), side
        assert n["mean_max_cos"][side] == pytest.approx(np.mean(maxima), abs=1e-5), side
        assert n["mean_max_cos"][side] >= n["mean_matched_cos"][side] - 1e-9
        assert 0.0 <= n["fraction_on_diagonal"][side] <= 1.0


def test_shuffled_trained_sae_is_fully_shared():
    """The paper's sanity argument on a real trained SAE of the smoke family."""
    from replication import experiments, matching
    from replication.sae.checkpoints import load_directions
    from replication.sae.directions import LatentDirections

    spec = experiments.FamilySpec.from_params(family_params())
    folder = experiments.family_dir(spec) / f"seed{spec.seeds[0]}" / spec.hook
    assert folder.exists(), f"{folder} missing: run `make nbval` first"
    dirs = load_directions(folder)
    perm = np.random.default_rng(0).permutation(dirs.n_latents)
    shuffled = LatentDirections(dirs.encoder[perm], dirs.decoder[perm], name="shuffled")
    result = matching.match(dirs, shuffled, cache=False)
    assert np.array_equal(result.dec_partner[perm], np.arange(dirs.n_latents))
    assert all(v == 1.0 for v in matching.shared_fractions(result).values())


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_every_figure_json_is_standard_json():
    """NaN / Infinity are not JSON: figure files must parse in strict readers (jq, JavaScript)."""
    files = sorted((paths.FIGURES_DIR / PROFILE).glob("*.json"))
    assert files, "run `make nbval` first"
    for path in files:
        json.loads(path.read_text(), parse_constant=_reject_constant)


def test_strict_json_writer_turns_non_finite_into_null(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": float("nan"), "b": [np.float32(np.inf), 1.5], "c": np.array([np.nan, 2.0])},
                      strict=True)
    assert json.loads(path.read_text(), parse_constant=_reject_constant) == {"a": None, "b": [None, 1.5],
                                                                             "c": [None, 2.0]}


ALL_FIGURES = sorted(p.stem for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("name", ALL_FIGURES)
def test_figure_json_names_its_resolved_dtypes(name):
    """params.resolved_dtypes agrees with the family's own record, the activation cache's manifest and
    the checkpoints' training.json: three places written by different code."""
    from replication import experiments
    from replication.lm.activations import ActivationCache
    from replication.plotting import load_figure_json

    smoke_numbers(name)
    saved = load_figure_json(name, PROFILE)
    dtypes = saved["params"]["resolved_dtypes"]
    assert set(dtypes) == {"model", "select"} and set(dtypes.values()) <= {"float32", "bfloat16"}
    family = saved["numbers"].get("family")
    if not isinstance(family, dict) or "spec" not in family:
        return
    assert family["resolved_dtypes"] == dtypes
    manifest = ActivationCache.open(paths.ACTIVATIONS_DIR / family["activation_cache"], verify=False).manifest
    assert manifest["resolved_dtypes"]["model"] == dtypes["model"] == manifest["settings"]["model_dtype"]
    spec = experiments.FamilySpec.from_params(family["spec"])
    info = json.loads((experiments.family_dir(spec) / f"seed{spec.seeds[0]}" / spec.hook / "training.json").read_text())
    assert info["resolved_dtypes"] == {"model": dtypes["model"], "select": dtypes["select"], "weights": "float32"}


@pytest.mark.parametrize("name", ["01_fig1_bimodal_cosine", "02_fig2_kseed_decay", "03_fig3_firing_frequency",
                                  "04_figA1_threshold", "05_figA2_A3_hungarian_vs_maxcos", "09_per_latent_stability",
                                  "11_live_only_statistics", "13_reproducible_subspaces", "15_pooling"])
def test_family_figures_report_pw_mcc_with_both_floors(name):
    """Every figure of a seed family reports Song et al.'s PW-MCC beside its shared fractions (the same family, the
    same number, recomputed here from the matchings), with its untrained and random-model floors, recomputed too."""
    n = numbers(name)
    family = _smoke_family(name)
    fm = family.matching
    expected = np.mean([fm.result(i, j).dec_cos.mean() for i in range(fm.n_seeds) for j in range(i + 1, fm.n_seeds)])
    assert n["pw_mcc"]["estimate"] == pytest.approx(expected, abs=1e-6)
    lo, hi = n["pw_mcc"]["ci95_seed"]
    assert lo <= n["pw_mcc"]["estimate"] <= hi
    # its two floors: untrained SAEs of the same shape, and the same spec trained on the random-initialised model
    base = n["pw_mcc"]["baselines"]
    from replication.analysis.stability import untrained_pw_mcc

    spec = family.spec
    assert base["untrained"]["estimate"] == pytest.approx(untrained_pw_mcc(
        spec.architecture, family.cache.d_model, spec.n_latents, spec.k, spec.seeds, n_boot=10, cache=False)["estimate"],
        abs=1e-9)   # recomputed, not read from the notebooks' cached matchings
    random_spec = dataclasses.replace(family.spec, random_model=True, seeds=tuple(base["random_model"]["seeds"]),
                                      checkpoint_at_tokens=())
    rm = experiments.seed_family(random_spec, progress=False).matching
    pairs = [(i, j) for i in range(rm.n_seeds) for j in range(i + 1, rm.n_seeds)]
    recomputed = np.mean([rm.result(i, j).dec_cos.mean() for i, j in pairs])
    assert base["random_model"]["estimate"] == pytest.approx(recomputed, abs=1e-6)
    assert len(base["random_model"]["seeds"]) >= 2 and base["random_model"]["n_pairs"] == len(pairs)
