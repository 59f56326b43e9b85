"""The family settings have one home: `notebooks/params/family/<profile>.yaml`."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import yaml

from replication import paths, training
from replication.experiments import FamilySpec, family_overrides


def test_spec_defaults_equal_the_default_profile() -> None:
    """Fails when someone edits `FamilySpec`'s defaults or `default.yaml` without the other."""
    assert FamilySpec() == FamilySpec.from_profile("default")


@pytest.mark.parametrize("profile", paths.profile_names())
def test_every_profile_file_holds_only_family_fields(profile: str) -> None:
    params = yaml.safe_load(paths.family_params_file(profile).read_text())
    spec = FamilySpec.from_profile(profile)
    for key, value in params.items():
        got = getattr(spec, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_overrides_change_the_family_and_bad_names_are_clear_errors() -> None:
    spec = FamilySpec.from_profile("default", n_latents=512, seeds=[0, 1])
    assert (spec.n_latents, spec.seeds, spec.k) == (512, (0, 1), 32)
    with pytest.raises(ValueError, match="unknown profile 'huge'.*default"):
        FamilySpec.from_profile("huge")
    with pytest.raises(ValueError, match=r"\['n_latent'\] are not family settings"):
        FamilySpec.from_profile("default", n_latent=512)


def test_notebook_namespace_overrides_pick_only_family_fields() -> None:
    """What papermill injects (`-p n_latents 512`, `-p model_dtype float32`) reaches the spec; a notebook's
    own parameters (threshold, n_boot) do not."""
    namespace = {"profile": "smoke", "threshold": 0.7, "n_boot": 100, "n_latents": 512, "model_dtype": "float32"}
    assert family_overrides(namespace) == {"n_latents": 512, "model_dtype": "float32"}
    spec = FamilySpec.from_profile("smoke", **family_overrides(namespace))
    assert (spec.n_latents, spec.model_dtype, spec.seq_len) == (512, "float32", 128)


def test_no_notebook_repeats_the_family_settings() -> None:
    """Notebooks hold `profile` and their own settings; the family block lives only in the profile files."""
    family_keys = set(FamilySpec.__dataclass_fields__)
    for nb in sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
        assert len(cells) == 1, nb.name
        assigned = {line.split("=")[0].strip() for line in "".join(cells[0]["source"]).splitlines()
                    if "=" in line and not line.lstrip().startswith("#")}
        assert "profile" in assigned, nb.name
        assert not assigned & family_keys, f"{nb.name} repeats family settings {sorted(assigned & family_keys)}"
        for params_file in (paths.NOTEBOOKS_DIR / "params" / nb.stem).glob("*.yaml"):
            own = yaml.safe_load(params_file.read_text()) or {}
            assert not set(own) & family_keys, f"{params_file} repeats family settings {sorted(set(own) & family_keys)}"


def test_learning_rate_rule_lives_in_one_function() -> None:
    assert training.learning_rate(2**14) == pytest.approx(2e-4)
    assert training.learning_rate(1024, 4.0) == pytest.approx(4.0 * 2e-4 / (1024 / 2**14) ** 0.5)
    assert training.learning_rate(1024, 4.0, lr=1e-3) == 1e-3
    assert training.TrainConfig(n_latents=1024).resolved_lr() == training.learning_rate(1024)
    assert asdict(FamilySpec())["lr"] is None


def test_default_ablation_points_have_at_least_four_seeds() -> None:
    """Seed-level intervals need seeds to resample: every default ablation point trains >= 4 seeds (6 pairs)."""
    for name, key in (("06_fig4_size_k_tokens", "sweep_seeds"), ("07_fig5_layer_model_arch", "ablation_seeds"),
                      ("16_convergence", "budget_seeds"), ("17_consistency_views", "arch_seeds")):
        value = paths.notebook_settings(name, "default")[key]      # the parameters cell, then default.yaml
        assert len(value) >= 4, (name, value)


@pytest.mark.parametrize("profile", ["smoke", "default", "paper"])
def test_figure5_architecture_panel_and_notebook_17_share_families(profile: str) -> None:
    """Figure 5's architecture panel reuses notebook 17's families only if both train them at the same size
    and budget, calibrated from the same first round. Those settings have one home, notebook 17's params
    file: notebook 07's files must not set them, and 07 resolves them from 17's (its own value wins only
    when a user passes one)."""
    from replication.studies import consistency

    def own(name: str) -> dict:
        f = paths.notebook_params_file(name, profile)
        return (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}

    a, b = own("07_fig5_layer_model_arch"), own("17_consistency_views")
    assert not set(a) & set(consistency.ARCHITECTURE_PANEL_KEYS), (profile, sorted(a))
    assert consistency.shared_architecture_settings(profile) == {k: b.get(k) for k in consistency.ARCHITECTURE_PANEL_KEYS}
    assert consistency.shared_architecture_settings(profile, arch_n_latents=48)["arch_n_latents"] == 48
    with pytest.raises(ValueError, match=r"\['k'\] are not architecture-panel settings"):
        consistency.shared_architecture_settings(profile, k=8)


def test_a_profile_without_notebook_17s_params_file_takes_its_parameters_cell() -> None:
    """A user's own profile may have no params file for notebook 17: Figure 5's architecture panel then asks
    for what notebook 17 would run on, its parameters cell (all None: the family's size and budget)."""
    from replication.studies import consistency

    with pytest.raises(ValueError, match="no 17_consistency_views settings"):
        paths.notebook_settings("17_consistency_views", "no-such-profile")
    cell = paths.notebook_settings("17_consistency_views", "no-such-profile", missing_ok=True)
    assert cell["threshold"] == 0.7 and cell["arch_seeds"] == [0, 1, 2, 3]
    keys = consistency.ARCHITECTURE_PANEL_KEYS
    assert consistency.shared_architecture_settings("no-such-profile") == {k: cell[k] for k in keys}
    assert consistency.shared_architecture_settings("no-such-profile", arch_n_tokens=5)["arch_n_tokens"] == 5


def test_borrowed_settings_names_a_key_the_lending_notebook_does_not_set() -> None:
    """`paths.borrowed_settings` (notebooks 07 and 18 borrow 17's and 16's settings): a key the lender sets
    nowhere is an error naming it, unless the borrower passes it or `missing_ok` lets the borrower fall back."""
    keys = ("budgets", "no_such_key")
    with pytest.raises(ValueError, match=r"16_convergence sets no \['no_such_key'\]"):
        paths.borrowed_settings("16_convergence", "smoke", keys, {}, what="budget")
    got = paths.borrowed_settings("16_convergence", "smoke", keys, {"no_such_key": 3, "budgets": None}, what="budget")
    assert got["no_such_key"] == 3
    assert got["budgets"] == paths.notebook_settings("16_convergence", "smoke")["budgets"]
    assert paths.borrowed_settings("16_convergence", "smoke", keys, {}, what="budget", missing_ok=True)["no_such_key"] is None
    with pytest.raises(ValueError, match=r"\['k'\] are not budget settings"):
        paths.borrowed_settings("16_convergence", "smoke", keys, {"k": 1}, what="budget")
