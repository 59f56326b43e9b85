"""Pooling stable latents across seeds (replication.studies.pooling)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication import pooling, synthetic
from replication.analysis.matching import match
from replication.analysis.stability import FamilyMatching
from replication.sae.architectures import build_sae


def _family(n_seeds=3, n=20, d=32, n_common=8, seed=0):
    """SAEs whose first `n_common` latents (shuffled per seed) are the same feature; the rest random."""
    rng = np.random.default_rng(seed)
    common = np.linalg.qr(rng.standard_normal((d, d)))[0].T[:n_common]
    saes, perms = [], []
    for s in range(n_seeds):
        sae = build_sae("topk", d, n, k=4, seed=100 + s)
        perm = rng.permutation(n)
        with torch.no_grad():
            for c in range(n_common):
                sae.W_dec[perm[c]] = torch.from_numpy(common[c]).float()
                sae.encoder.weight[perm[c]] = torch.from_numpy(common[c]).float()
        saes.append(sae)
        perms.append(perm)
    fm = FamilyMatching([s.latent_directions(name=f"s{i}") for i, s in enumerate(saes)], cache=False, progress=False)
    return saes, perms, fm, common


def test_components_dedupe_the_common_features():
    saes, perms, fm, common = _family()
    pool = pooling.stable_components(fm, [0, 1, 2], min_shared=2)
    assert len(pool) == len(common)
    assert (pool.n_seeds_in == 3).all()
    for members in pool.members:
        assert sorted(s for s, _ in members) == [0, 1, 2]
    # a stricter requirement than possible keeps nothing but raises nothing; bad arguments raise
    with pytest.raises(ValueError, match="min_shared"):
        pooling.stable_components(fm, [0, 1, 2], min_shared=3)
    with pytest.raises(ValueError, match="build seeds"):
        pooling.stable_components(fm, [0], min_shared=1)


def test_pooled_sae_copies_representatives_and_fills():
    saes, perms, fm, common = _family()
    pool = pooling.stable_components(fm, [0, 1, 2], min_shared=1)
    sae, info = pooling.pooled_sae(pool, saes, fill="random")
    assert info["from_pool"] == len(pool) and info["filled"] == 20 - len(pool)
    dec = sae.W_dec.detach().numpy()
    for slot, (s, lat) in enumerate(pool.rep):
        assert np.allclose(dec[slot], saes[s].W_dec[lat].detach().numpy())
    # every common feature appears exactly once
    cos = np.abs(common @ dec.T)
    assert ((cos > 0.999).sum(1) == 1).all()
    based, info_b = pooling.pooled_sae(pool, saes, fill="base", base=0)
    assert info_b["filled_from_base"] == 20 - len(pool)
    base_dirs = saes[0].W_dec.detach().numpy()
    assert all(np.abs(base_dirs @ row).max() > 0.999 for row in based.W_dec.detach().numpy())
    with pytest.raises(ValueError, match="fill"):
        pooling.pooled_sae(pool, saes, fill="nope")


def test_fine_tune_improves_fvu_and_leaves_the_input_alone():
    torch.set_num_threads(1)
    truth = synthetic.make_ground_truth(synthetic.SyntheticSpec(d=32, n_separated=16, n_groups=0))
    x = synthetic.sample(truth, 20_000, seed=0)
    held = synthetic.sample(truth, 2_000, seed=1)
    sae = build_sae("topk", 32, 32, k=4, seed=0)
    before = sae.W_dec.detach().clone()
    from replication.sae.training import evaluate_sae

    tuned, metrics = pooling.fine_tune(sae, x, 100_000, batch_size=256, lr=5e-3, heldout=held)
    assert torch.equal(sae.W_dec, before)
    assert metrics["fvu"] < 0.5 * evaluate_sae(sae, held)["fvu"]


def test_stability_against_copies_and_strangers():
    saes, perms, fm, common = _family()
    same = pooling.stability_against(saes[0], [saes[0]])
    assert same["mean_shared_fraction"] == 1.0
    other = pooling.stability_against(saes[0], saes[1:])
    assert other["shared_with_all"] == pytest.approx(len(common) / 20)
    # PW-MCC: 1 against a copy of itself; against the others, the mean matched decoder cosine of each pair
    assert same["pw_mcc"] == pytest.approx(1.0, abs=1e-6)
    expected = [float(np.mean(match(saes[0].latent_directions(name="a"), o.latent_directions(name="b"), cache=False).dec_cos))
                for o in saes[1:]]
    assert other["pw_mcc_per_other"] == pytest.approx(expected) and other["pw_mcc"] == pytest.approx(np.mean(expected))
    assert other["pw_mcc"] < same["pw_mcc"]
