"""BatchTopK (Bussmann et al. 2024, dictionary_learning): batch-level top-k at training, threshold at inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication.sae.architectures import BatchTopKSAE, build_sae
from replication.sae.checkpoints import load_sae
from replication.sae.training import DataConfig, TrainConfig, evaluate_sae, train_saes


def _relu_pre(sae: BatchTopKSAE, x: torch.Tensor) -> np.ndarray:
    """ReLU'd pre-activations computed independently in float64 numpy."""
    w = sae.encoder.weight.detach().double().numpy()
    b = sae.encoder.bias.detach().double().numpy()
    return np.maximum((x.double().numpy() - sae.b_dec.detach().double().numpy()) @ w.T + b, 0.0)


def test_training_keeps_the_k_times_batch_largest_activations_of_the_batch() -> None:
    torch.manual_seed(0)
    sae = build_sae("batchtopk", 24, 64, k=4, seed=1)
    with torch.no_grad():
        sae.encoder.bias.uniform_(-0.1, 0.3)
    x = torch.randn(32, 24)
    pre = _relu_pre(sae, x)
    cut = np.sort(pre.ravel())[-4 * 32]                       # the (k·B)-th largest value
    want = pre >= cut
    mask = sae.batch_topk_mask(torch.from_numpy(pre).float()).numpy()
    assert mask.sum() == 4 * 32 and (mask == want).all()
    per_token = mask.sum(1)
    assert per_token.min() != per_token.max()                # L0 varies per token; only the batch mean is k
    loss, stats = sae.training_loss(x, step=None)
    assert float(stats["l0"]) == pytest.approx(4.0)
    code = torch.from_numpy(pre * want)
    x_hat = code.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    tv = float(((x.double() - x.double().mean(0)) ** 2).sum())
    assert float(loss.detach()) == pytest.approx(float(((x_hat - x.double()) ** 2).sum() / tv), rel=1e-5)


def test_threshold_is_an_ema_of_the_smallest_kept_activation_and_drives_inference() -> None:
    torch.manual_seed(1)
    sae = build_sae("batchtopk", 16, 48, k=3, seed=2)
    x1, x2 = torch.randn(20, 16), torch.randn(20, 16)
    assert float(sae.threshold) == -1.0
    sae.training_loss(x1, step=0, total_steps=1000)           # before the start step (8 of 1000): no update
    assert float(sae.threshold) == -1.0
    mins = []
    for x in (x1, x2):
        pre = _relu_pre(sae, x)
        kept = pre[pre >= np.sort(pre.ravel())[-3 * 20]]
        mins.append(kept[kept > 0].min())
        sae.training_loss(x, step=500, total_steps=1000)
    assert float(sae.threshold) == pytest.approx(0.999 * mins[0] + 0.001 * mins[1], rel=1e-5)
    x = torch.randn(50, 16)
    pre = _relu_pre(sae, x)
    code = sae.encode(x).values.detach().double().numpy()
    np.testing.assert_allclose(code, pre * (pre > float(sae.threshold)), rtol=1e-5, atol=1e-6)
    # inference does not depend on the batch: one token alone gets the same code
    np.testing.assert_allclose(sae.encode(x[:1]).values.detach().numpy(), code[:1], rtol=1e-5, atol=1e-6)


def test_batchtopk_trains_to_l0_near_k_and_round_trips_with_its_threshold(tmp_path) -> None:
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((48, 16))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    acts = ((rng.exponential(1.0, (6000, 48)) * (rng.random((6000, 48)) < 0.06)) @ dictionary).astype(np.float32)
    cfg = TrainConfig(architecture="batchtopk", n_latents=64, k=4, seed=0, lr=3e-3)
    data = DataConfig(batch_size=256, n_tokens=256 * 80, data_seed=0)
    (res,) = train_saes(acts[:5000], [cfg], data, out_dirs=[tmp_path / "seed0"], heldout=acts[5000:], progress=False)
    sae = res.sae
    assert float(sae.threshold) > 0
    assert 2.0 < res.metrics["l0"] < 8.0                      # held-out, thresholded: near k = 4 on average
    assert res.metrics["fvu"] < 0.6
    back = load_sae(tmp_path / "seed0")
    assert isinstance(back, BatchTopKSAE) and float(back.threshold) == float(sae.threshold) and back.k == 4
    x = torch.from_numpy(acts[5000:5100])
    torch.testing.assert_close(back.encode(x).values, sae.encode(x).values)
    assert evaluate_sae(back, acts[5000:])["fvu"] == pytest.approx(res.metrics["fvu"], rel=1e-6)
    with pytest.raises(ValueError, match="batchtopk SAE needs k"):
        build_sae("batchtopk", 16, 64)


def test_dictionary_learning_batchtopk_reads_back_with_its_threshold() -> None:
    """A dictionary_learning BatchTopKSAE state dict (encoder.weight [n, d], decoder.weight [d, n], b_dec, k,
    threshold) becomes our BatchTopKSAE, and its code equals dictionary_learning's inference formula
    relu(W (x - b_dec) + b) * (relu(...) > threshold)."""
    from replication.sae.checkpoints import sae_from_state_dict

    gen = torch.Generator().manual_seed(0)
    d, n = 12, 40
    state = {"encoder.weight": torch.randn(n, d, generator=gen), "encoder.bias": 0.1 * torch.randn(n, generator=gen),
             "decoder.weight": torch.randn(d, n, generator=gen), "b_dec": torch.randn(d, generator=gen),
             "k": torch.tensor(5), "threshold": torch.tensor(0.8)}
    sae = sae_from_state_dict(state, {"dict_class": "BatchTopKSAE"}, source="dictionary_learning")
    assert isinstance(sae, BatchTopKSAE) and sae.k == 5 and float(sae.threshold) == pytest.approx(0.8)
    x = torch.randn(30, d, generator=gen)
    post = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    torch.testing.assert_close(sae.encode(x).values, post * (post > 0.8))
    torch.testing.assert_close(sae(x)["x_hat"], sae.encode(x).values @ state["decoder.weight"].T + state["b_dec"])
