"""Splicing: ablated reconstructions, activation mass, matched masks, spliced loss, bootstraps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication import splicing
from replication.sae.architectures import TopKSAE


def _sae(d: int = 16, n: int = 32, k: int = 4, seed: int = 0, scale: float = 2.0) -> TopKSAE:
    sae = TopKSAE(d, n, k, seed=seed, input_scale=scale)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_ablation_removes_exactly_the_latent_contribution():
    sae = _sae()
    x = torch.randn(50, 16)
    full = splicing.ablated_reconstruction(sae, x)
    with torch.no_grad():
        values, indices = sae.encode(x * sae.input_scale)
    mask = np.zeros(32, bool)
    mask[[1, 5, 7]] = True
    abl = splicing.ablated_reconstruction(sae, x, mask)
    dense = torch.zeros(50, 32).scatter(1, indices, values)
    removed = (dense[:, mask] @ sae.W_dec[mask]) / sae.input_scale
    torch.testing.assert_close(full - abl, removed, atol=1e-5, rtol=1e-5)
    everything = splicing.ablated_reconstruction(sae, x, np.ones(32, bool))
    torch.testing.assert_close(everything, (sae.b_dec / sae.input_scale).expand(50, -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask"):
        splicing.ablated_reconstruction(sae, x, np.zeros(31, bool))


def test_activation_mass_sums_values():
    sae = _sae()
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    mass = splicing.activation_mass(sae, x, batch_size=64)
    with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(x) * sae.input_scale)
    ref = torch.zeros(32).index_add_(0, indices.reshape(-1), values.reshape(-1)) / sae.input_scale
    np.testing.assert_allclose(mass, ref.numpy(), rtol=1e-5)
    assert mass.sum() > 0


def test_mass_and_count_matched_masks():
    rng = np.random.default_rng(0)
    mass = rng.uniform(0, 1, 100)
    pool = np.zeros(100, bool)
    pool[:60] = True
    m = splicing.mass_matched_mask(mass, pool, 5.0, rng)
    assert not m[~pool].any() and mass[m].sum() >= 5.0
    smallest = mass[m].sum() - mass[m].max()
    assert smallest < 5.0  # no latent could be removed ... for the last one added
    assert splicing.mass_matched_mask(mass, pool, 1e9, rng).sum() == 60
    assert splicing.count_matched_mask(pool, 7, rng).sum() == 7
    with pytest.raises(ValueError):
        splicing.mass_matched_mask(mass, pool[:50], 1.0, rng)


def test_ablation_conditions_match_mass():
    rng = np.random.default_rng(0)
    classes = np.array(["stable"] * 20 + ["unstable"] * 60 + ["intermediate"] * 20, dtype=object)
    mass = np.concatenate([rng.uniform(2, 3, 20), rng.uniform(0.5, 1.5, 60), rng.uniform(1, 5, 20)])
    conds, info = splicing.ablation_conditions(classes, mass, n_draws=4, seed=0)
    assert len(conds["stable"]) == 1 and conds["stable"][0].sum() == 20
    for m in conds["unstable_mass"]:
        assert np.all(classes[m] == "unstable") and mass[m].sum() >= info["target_mass"] * (1 - 1e-9)
    assert info["unstable_per_stable_masked"] > 1.5
    assert all(m.sum() == 20 for m in conds["unstable_count"])
    assert not conds["full"][0].any()
    # more stable mass than unstable: the stable side is drawn, mass-matched
    conds, info = splicing.ablation_conditions(classes, mass * np.where(classes == "stable", 3.0, 1.0), n_draws=2)
    assert len(conds["stable"]) == 2 and len(conds["unstable_mass"]) == 1 and conds["unstable_mass"][0].sum() == 60
    with pytest.raises(ValueError, match="stable"):
        splicing.ablation_conditions(np.array(["unstable"] * 5, dtype=object), np.ones(5))


def test_reconstruction_errors_give_fvu():
    sae = _sae()
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    all_mask = np.ones(32, bool)
    err, var = splicing.reconstruction_errors(sae, x, [None, all_mask], group_size=10, batch_size=64)
    assert err.shape == (2, 20) and var.shape == (20,)
    xt = torch.from_numpy(x)
    full = splicing.ablated_reconstruction(sae, xt)
    fvu = float(((full - xt) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum())
    assert err[0].sum() / var.sum() == pytest.approx(fvu, rel=1e-5)
    assert err[1].sum() > err[0].sum()


def test_bootstrap_ratio_deltas():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.2, 50)
    num = np.stack([base, base + 0.5, base])
    out = splicing.bootstrap_ratio_deltas(num, np.ones(50), reference=0, n_boot=500)
    assert out[0]["delta"] == 0 and out[0]["delta_low"] == 0
    assert out[1]["delta"] == pytest.approx(0.5) and out[1]["delta_low"] == pytest.approx(0.5)
    assert out[1]["low"] < out[1]["value"] < out[1]["high"]
    with pytest.raises(ValueError):
        splicing.bootstrap_ratio_deltas(num, np.ones(49))


def test_seed_level_asymmetry_averages_the_bases_and_widens_the_interval() -> None:
    rng = np.random.default_rng(1)
    names = ["full", "stable", "unstable_mass", "unstable_count", "random_mass"]

    def result(shift: float) -> splicing.AsymmetryResult:
        var = rng.uniform(1.0, 2.0, 40)
        err = np.stack([0.3 * var, (0.5 + shift) * var, 0.4 * var, 0.35 * var, 0.45 * var]) + rng.normal(0, 0.01, (5, 40))
        ce = np.stack([np.full(30, 3.0), np.full(30, 3.2 + shift), np.full(30, 3.1), np.full(30, 3.05), np.full(30, 3.15),
                       np.full(30, 2.9), np.full(30, 6.0)]) + rng.normal(0, 0.01, (7, 30))
        fvu = dict(zip(names, splicing.bootstrap_ratio_deltas(err, var, n_boot=200)))
        ce_d = dict(zip(names + ["clean", "zero"], splicing.bootstrap_ratio_deltas(ce, np.ones(30), n_boot=200)))
        paired = {"fvu": splicing.bootstrap_ratio_deltas(err, var, reference=2, n_boot=200)[1],
                  "ce": splicing.bootstrap_ratio_deltas(ce, np.ones(30), reference=2, n_boot=200)[1]}
        return splicing.AsymmetryResult(names, {}, fvu, ce_d, paired, 0.9, 30, 30 * 12, {}, (err, var), ce)

    results = [result(s) for s in (-0.08, 0.0, 0.08, 0.16)]
    out = splicing.seed_level_asymmetry(results, n_boot=500)
    assert out["n_bases"] == 4
    for key in ("fvu", "ce"):
        d = out[key]["stable_minus_unstable_mass"]
        assert d["estimate"] == pytest.approx(np.mean([r.paired[key]["delta"] for r in results]))
        assert d["per_base"] == pytest.approx([r.paired[key]["delta"] for r in results])
        lo, hi = d["ci95_seed"]
        one = results[0].paired[key]
        assert hi - lo > 2 * (one["delta_high"] - one["delta_low"])      # the bases differ far more than the sequences
        assert out[key]["stable"]["estimate"] == pytest.approx(np.mean([r.__dict__[key]["stable"]["delta"] for r in results]))
    assert "clean" in out["ce"] and "full" not in out["ce"]
    with pytest.raises(ValueError, match="same conditions"):
        splicing.seed_level_asymmetry([results[0], splicing.AsymmetryResult(names[:-1], {}, {}, {}, {}, 0, 0, 0, {})])


def _tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
                                  act_fn="relu", seed=0, device="cpu")
    return HookedTransformer(cfg)


def test_spliced_losses_clean_zero_and_full_ablation():
    model = _tiny_model()
    sae = _sae(scale=1.0)
    with torch.no_grad():
        sae.b_dec.zero_()
    windows = np.random.default_rng(0).integers(0, 40, size=(6, 12))
    out = splicing.spliced_losses(model, sae, "blocks.1.hook_mlp_out", windows, [None, np.ones(32, bool)], batch_seqs=4)
    with torch.no_grad():
        ref = model(torch.from_numpy(windows), return_type="loss", loss_per_token=True).double().mean(1).numpy()
    np.testing.assert_allclose(out["clean"], ref, rtol=1e-5)
    # every latent ablated and b_dec = 0: the reconstruction is 0, the same as zeroing the activation
    np.testing.assert_allclose(out["mask1"], out["zero"], rtol=1e-5)
    assert not np.allclose(out["mask0"], out["clean"])
    with pytest.raises(ValueError, match="block hook"):
        splicing.spliced_losses(model, sae, "hook_embed", windows, [None])
