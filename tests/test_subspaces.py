"""Principal angles, captured variance and the cross-seed subspace analysis (replication.studies.subspaces)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication import subspaces
from replication.sae.architectures import build_sae


def test_principal_angles_of_equal_orthogonal_and_tilted_subspaces():
    eye = np.eye(6)
    a, b = eye[:, :2], eye[:, 2:4]
    assert np.allclose(subspaces.principal_angle_cosines(a, a), 1.0)
    assert np.allclose(subspaces.principal_angle_cosines(a, b), 0.0)
    t = 0.3
    tilted = np.stack([eye[:, 0], np.cos(t) * eye[:, 1] + np.sin(t) * eye[:, 2]], axis=1)
    assert np.allclose(subspaces.principal_angle_cosines(a, tilted), [1.0, np.cos(t)])
    # a rotation inside the subspace leaves it unchanged
    rot = a @ np.array([[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]])
    assert subspaces.mean_cos2(a, rot) == pytest.approx(1.0)


def test_random_subspaces_match_their_expected_overlap():
    d, r = 200, 10
    vals = [subspaces.mean_cos2(subspaces.random_subspace(d, r, s), subspaces.random_subspace(d, r, s + 100)) for s in range(40)]
    assert np.mean(vals) == pytest.approx(subspaces.random_mean_cos2(d, r, r), rel=0.15)


def test_top_subspace_and_captured_variance():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((30, 3)))[0]
    x = rng.standard_normal((500, 3)) @ basis.T
    q = subspaces.top_subspace(x, 3)
    assert subspaces.mean_cos2(q, basis) == pytest.approx(1.0)
    assert subspaces.captured_variance(x, q) == pytest.approx(1.0)
    assert subspaces.captured_variance(x, subspaces.top_subspace(x, 1)) < 1.0
    with pytest.raises(ValueError, match="numerical rank"):
        subspaces.top_subspace(x, 5)
    assert subspaces.top_subspace(x, 5, strict=False).shape == (30, 3)
    with pytest.raises(ValueError, match="disagree on d"):
        subspaces.captured_variance(x, np.eye(4)[:, :2])


def test_cross_seed_capture_finds_a_shared_subspace_and_not_a_private_one():
    """Seeds whose unstable parts live in one shared 4-D subspace (in different bases) transfer;
    seeds with private subspaces do not. The second case is what makes the first meaningful."""
    rng = np.random.default_rng(1)
    d, n = 40, 800
    shared = np.linalg.qr(rng.standard_normal((d, 4)))[0]
    same = [rng.standard_normal((n, 4)) @ np.linalg.qr(rng.standard_normal((4, 4)))[0] @ shared.T for _ in range(3)]
    private = [rng.standard_normal((n, 4)) @ np.linalg.qr(rng.standard_normal((d, 4)))[0].T for _ in range(3)]
    good = subspaces.capture_table(subspaces.cross_seed_capture(same, [4], n_random=5)).iloc[0]
    bad = subspaces.capture_table(subspaces.cross_seed_capture(private, [4], n_random=5)).iloc[0]
    assert good.cross_seed == pytest.approx(1.0, abs=1e-6) and good.within == pytest.approx(1.0, abs=1e-6)
    assert bad.cross_seed < 0.3 and bad.within == pytest.approx(1.0, abs=1e-6)
    assert good.random < 0.3 and good.mean_cos2 == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same tokens"):
        subspaces.cross_seed_capture([same[0], same[1][:10]], [2])


def test_latent_contributions_sum_to_the_reconstruction():
    sae = build_sae("topk", 16, 32, k=4, seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    mask = np.zeros(32, bool)
    mask[:10] = True
    part = subspaces.latent_contributions(sae, x, mask)
    rest = subspaces.latent_contributions(sae, x, ~mask)
    with torch.no_grad():
        recon = sae(torch.from_numpy(x))["x_hat"].numpy() - sae.b_dec.numpy()
    assert np.allclose(part + rest, recon, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        subspaces.latent_contributions(sae, x, np.ones(5, bool))


def test_latent_groups_do_not_overlap():
    g = subspaces.latent_groups(np.array([[0, 1, 3, 4]]), 1, 3)
    assert g["unstable"].tolist() == [[True, True, False, False]] and g["stable"].tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="overlap"):
        subspaces.latent_groups(np.zeros((1, 3)), 2, 2)
