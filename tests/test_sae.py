"""SAE architectures: sparse TopK gradients equal dense autograd, init, seed isolation, firing counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from replication.sae.architectures import (
    GatedSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKAutoencode,
    TopKSAE,
    build_sae,
    firing_counts,
    topk_loss_and_grads,
)

D_IN, N_LAT, K = 6, 10, 3


def _dense_reference(sae: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                     auxk_alpha: float = 0.0) -> torch.Tensor:
    """Plain autograd through a dense [B, n] code (sparsify's maths, no sparse kernels)."""
    W_enc, b_enc, W_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    pre = F.relu((x - b_dec) @ W_enc.T + b_enc)
    vals, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    x_hat = z @ W_dec + b_dec
    e = x - x_hat
    tv = (x - x.mean(0)).pow(2).sum()
    loss = e.pow(2).sum() / tv
    if dead_mask is not None and auxk_alpha > 0:
        num_dead = int(dead_mask.sum())
        k_aux = min(sae.d_in // 2, num_dead)
        scale = min(num_dead / (sae.d_in // 2), 1.0)
        aux_pre = torch.where(dead_mask[None], pre, -torch.inf)
        a_vals, a_idx = aux_pre.topk(k_aux, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, a_idx, a_vals)
        e_hat = z_aux @ W_dec + b_dec
        loss = loss + auxk_alpha * scale * (e_hat - e.detach()).pow(2).sum() / tv
    return loss


def _grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def _topk_sae(seed: int = 0) -> TopKSAE:
    sae = TopKSAE(D_IN, N_LAT, K, seed=seed, dtype=torch.float64)
    with torch.no_grad():  # non-trivial biases so every gradient path is exercised
        sae.encoder.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return sae


def test_sparse_autograd_function_matches_dense_autograd() -> None:
    x = torch.randn(17, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sae = _topk_sae()
    _dense_reference(sae, x).backward()
    ref = _grads(sae)
    sae.zero_grad(set_to_none=True)
    loss, _ = sae.training_loss(x)
    loss.backward()
    for name, g in _grads(sae).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_function_input_gradient_and_values_gradient() -> None:
    """gradcheck the Function itself, including a loss that uses the returned values (L1-like)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, D_IN, dtype=torch.float64, generator=gen, requires_grad=True)
    sae = _topk_sae()
    params = [x, sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]

    def fn(x_, w_enc, b_enc, w_dec, b_dec):
        x_hat, vals, _ = TopKAutoencode.apply(x_, w_enc, b_enc, w_dec, b_dec, K)
        return x_hat.pow(2).sum() + vals.sum() * 0.3

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("auxk", [False, True])
def test_manual_sparse_grads_match_dense_autograd(auxk: bool) -> None:
    x = torch.randn(23, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sae = _topk_sae()
    dead = torch.zeros(N_LAT, dtype=torch.bool)
    dead[[1, 4, 7, 8]] = True
    alpha = 0.5 if auxk else 0.0
    _dense_reference(sae, x, dead if auxk else None, alpha).backward()
    ref = _grads(sae)
    for p in sae.parameters():
        p.grad = torch.full_like(p, 123.0)  # stale values must be overwritten, not accumulated
    stats = topk_loss_and_grads(sae, x, dead_mask=dead if auxk else None, auxk_alpha=alpha)
    for name, g in _grads(sae).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-12, msg=name)
    assert stats["fired"].dtype == torch.bool and stats["fired"].shape == (N_LAT,)


def test_init_matches_sparsify_and_uses_no_global_rng() -> None:
    state = torch.random.get_rng_state()
    sae = TopKSAE(D_IN, N_LAT, K, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "construction consumed the global RNG"
    w = sae.encoder.weight
    bound = 1 / math.sqrt(D_IN)
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    assert torch.equal(sae.encoder.bias, torch.zeros(N_LAT))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N_LAT))
    torch.testing.assert_close(sae.W_dec, w / w.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    again = TopKSAE(D_IN, N_LAT, K, seed=7)
    other = TopKSAE(D_IN, N_LAT, K, seed=8)
    assert torch.equal(again.encoder.weight, w)
    assert not torch.equal(other.encoder.weight, w)
    for cls in (ReLUSAE, GatedSAE, JumpReLUSAE):  # same tied init for every architecture
        assert torch.equal(cls(D_IN, N_LAT, seed=7).encoder.weight, w)


@pytest.mark.parametrize("arch", ["topk", "relu", "gated", "jumprelu"])
def test_interface_and_directions(arch: str) -> None:
    sae = build_sae(arch, D_IN, N_LAT, k=K, seed=0)
    x = torch.randn(9, D_IN)
    out = sae(x)
    assert out["x_hat"].shape == (9, D_IN)
    loss, stats = sae.training_loss(x, l1_coefficient=0.1)
    loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    dirs = sae.latent_directions()
    assert dirs.encoder.shape == dirs.decoder.shape == (N_LAT, D_IN)
    np.testing.assert_array_equal(dirs.encoder, sae.encoder.weight.detach().numpy())
    assert sae.n_latents == N_LAT and sae.d_in == D_IN
    assert stats["fired"].shape == (N_LAT,)


def test_gated_aux_loss_uses_frozen_decoder() -> None:
    sae = GatedSAE(D_IN, N_LAT, seed=0)
    x = torch.randn(11, D_IN)
    with torch.no_grad():
        sae.b_gate.fill_(-100.0)  # gate closed everywhere: reconstruction is b_dec only
    loss, stats = sae.training_loss(x, l1_coefficient=0.0)
    loss.backward()
    # With no active latent, W_dec gets no gradient (the aux term's decoder copy is frozen).
    assert torch.count_nonzero(sae.W_dec.grad) == 0
    assert float(stats["l0"]) == 0.0


def test_jumprelu_scales_with_the_input_norm() -> None:
    """The paper's bandwidth and initial threshold (0.001 at unit mean squared input norm) in our units (mean squared
    norm d_in): on such inputs a fresh SAE's kernel window catches pre-activations, so its thresholds get a gradient;
    with the unscaled 0.001 at d 576 most latents get none (the failure that kept every latent firing)."""
    d, n = 576, 64
    x = torch.randn(1024, d)                               # mean squared norm ~ d, as the caches are normalised
    scaled = JumpReLUSAE(d, n, seed=0)
    assert scaled.bandwidth == pytest.approx(0.001 * d ** 0.5) and scaled.init_threshold == scaled.bandwidth
    unscaled = JumpReLUSAE(d, n, seed=0, bandwidth=0.001, init_threshold=0.001)
    in_window = []    # the share of (token, latent) pre-activations inside the kernel: the only route of the L0 gradient
    for sae in (scaled, unscaled):
        pre = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias)).detach()
        in_window.append(float(((pre - sae.init_threshold).abs() < sae.bandwidth / 2).float().mean()))
        loss, _ = sae.training_loss(x, l1_coefficient=1.0)
        loss.backward()
        assert torch.count_nonzero(sae.log_threshold.grad) > 0
    assert in_window[0] > 10 * in_window[1] and in_window[1] < 1e-3, in_window


def test_jumprelu_threshold_gets_straight_through_gradient() -> None:
    sae = JumpReLUSAE(D_IN, N_LAT, seed=0, bandwidth=0.5, init_threshold=0.2)
    loss, _ = sae.training_loss(torch.randn(64, D_IN), l1_coefficient=1.0)
    loss.backward()
    assert torch.count_nonzero(sae.log_threshold.grad) > 0


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_firing_counts_match_brute_force(arch: str, tmp_path) -> None:
    sae = build_sae(arch, D_IN, N_LAT, k=K, seed=1)
    acts = np.random.default_rng(0).standard_normal((37, D_IN)).astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=acts.shape)
    mm[:] = acts
    counts = firing_counts(sae, mm, batch_size=8, device="cpu", progress=False)
    with torch.no_grad():
        if arch == "topk":
            pre = F.relu(sae.pre_activations(torch.from_numpy(acts)))
            vals, idx = pre.topk(K, dim=1)
            expected = np.zeros(N_LAT, dtype=np.int64)
            np.add.at(expected, idx[vals > 0].numpy(), 1)
        else:
            expected = (sae.encode(torch.from_numpy(acts)).values > 0).sum(0).numpy()
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected)


def test_bad_k_is_rejected() -> None:
    with pytest.raises(ValueError, match="k=11"):
        TopKSAE(D_IN, N_LAT, 11)


def test_bf16_selection_keeps_exact_values_and_gradients() -> None:
    """select_dtype=bf16 only chooses the latents; values and gradients stay exact (float64 here)."""
    x = torch.randn(23, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sae = _topk_sae()
    exact = topk_loss_and_grads(sae, x)
    ref = _grads(sae)
    low = topk_loss_and_grads(sae, x, select_dtype=torch.bfloat16)
    assert torch.equal(exact["fired"], low["fired"])  # same selection on this well-separated data
    torch.testing.assert_close(low["fvu"], exact["fvu"], rtol=1e-12, atol=0)
    for name, g in _grads(sae).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_decoder_gradient_projection_removes_exactly_the_parallel_part() -> None:
    """sparsify's step keeps unit-norm decoder rows by removing each row's gradient component along the row:
    afterwards grad . W_dec[n] = 0 for every row, and the perpendicular part is untouched (checked against
    the projection written out in float64)."""
    torch.manual_seed(0)
    sae = build_sae("topk", 12, 20, k=3, seed=0)
    g = torch.randn(20, 12)
    sae.W_dec.grad = g.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    w, g64 = sae.W_dec.detach().double(), g.double()
    expected = g64 - (g64 * w).sum(1, keepdim=True) * w          # rows of W_dec are unit norm
    torch.testing.assert_close(sae.W_dec.grad.double(), expected, atol=1e-6, rtol=1e-6)
    assert (sae.W_dec.grad.double() * w).sum(1).abs().max() < 1e-5
    assert torch.allclose(w.norm(dim=1), torch.ones(20, dtype=torch.float64), atol=1e-6)


def test_a_revised_architecture_gets_new_keys_and_the_others_keep_theirs() -> None:
    """JumpReLU's scaled bandwidth changed its training: its family key (the checkpoint folder) and its run key
    (inside the folder) both change, so no SAE trained before is reused; TopK's keys are as they were."""
    from replication import experiments
    from replication.sae.training import TrainConfig

    topk = experiments.FamilySpec(model_dtype="float32", select_dtype="float32", n_tokens=4_000_000,
                                  n_train_tokens=1_000_000)   # the budget and cache then
    assert topk.training_key() == "883c1d1386c1"          # the key before the revision existed
    jump = experiments.FamilySpec(model_dtype="float32", select_dtype="float32", architecture="jumprelu", k=None,
                                  n_tokens=4_000_000, n_train_tokens=1_000_000)
    assert "revision" in TrainConfig(architecture="jumprelu").settings() and "revision" not in TrainConfig().settings()
    assert jump.training_key() == "452c6c5045ac" != "0aa2ac888802"   # now, and before the revision
