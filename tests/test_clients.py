"""Round trips with the real clients (`pip install -e '.[clients]'`): eai-sparsify and sae-lens.

Each test skips when its client is not installed, so the normal suite passes without them.
Checkpoints written by the client are read back by `checkpoints.load_sae` / `load_directions` and
must give the writer's directions, encode and decode; checkpoints we export must load in the client
and reproduce our FVU on raw (unscaled) activations.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from replication.compare import compare_saes
from replication.sae.architectures import build_sae
from replication.sae.checkpoints import export_sae, load_directions, load_sae, sae_from_object, save_sae
from replication.sae.training import evaluate_sae

D_IN, N_LAT, K = 32, 96, 6


def _inputs(n: int = 400, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.from_numpy(np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (biases included), from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _trained_like(seed: int, input_scale: float) -> "torch.nn.Module":
    """One of our TopK SAEs with non-zero biases, unit decoder rows and an input scale."""
    sae = build_sae("topk", D_IN, N_LAT, k=K, seed=seed, input_scale=input_scale)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 100))
    return sae


# ----------------------------------------------------------------------------------------------
# eai-sparsify
# ----------------------------------------------------------------------------------------------
def test_sparsify_checkpoint_reads_back(tmp_path) -> None:
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N_LAT, k=K))
    _randomise(coder, 0)
    coder.set_decoder_norm_to_unit_norm()
    coder.save_to_disk(tmp_path / "layers.3")
    dirs = load_directions(tmp_path / "layers.3")
    np.testing.assert_array_equal(dirs.encoder, coder.encoder.weight.detach().numpy())
    np.testing.assert_array_equal(dirs.decoder, coder.W_dec.detach().numpy())
    ours = load_sae(tmp_path)                        # a run dir with one hookpoint
    x = _inputs()
    with torch.no_grad():
        theirs, mine = coder(x), ours(x)
    assert torch.equal(theirs.latent_indices.sort(dim=1).values, mine["indices"])
    torch.testing.assert_close(mine["x_hat"], theirs.sae_out, atol=1e-5, rtol=1e-5)
    assert sae_from_object(coder).k == K             # the in-memory object too
    other = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N_LAT, k=K))
    report = compare_saes([coder, other], n_boot=20, plots=False)
    assert report.summary["n_latents"] == N_LAT


def test_our_export_loads_in_sparsify_and_reproduces_fvu(tmp_path, caplog) -> None:
    sparsify = pytest.importorskip("sparsify")
    sae = _trained_like(1, input_scale=0.25)
    folder = save_sae(sae, tmp_path / "ours", "layer")
    raw = _inputs(2000, seed=3, scale=4.0)             # activations on the model's own (unscaled) scale
    ours = evaluate_sae(sae, raw.numpy())              # scales by input_scale itself, as in training
    export = export_sae(folder, tmp_path / "exported" / "layer")
    with caplog.at_level(logging.WARNING):
        coder = sparsify.SparseCoder.load_from_disk(export)
    assert "Dropping extra args" not in caplog.text     # every key we write is one sparsify knows
    with torch.no_grad():
        out = coder(raw)
        mine = sae(raw * sae.input_scale)
    assert float(out.fvu) == pytest.approx(ours["fvu"], rel=1e-2)
    assert float(out.fvu) == pytest.approx(ours["fvu"], rel=1e-4)   # in fact equal up to float rounding
    assert torch.equal(out.latent_indices.sort(dim=1).values, mine["indices"])
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(N_LAT), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# sae-lens
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["standard", "topk", "topk-rescaled", "standard-no-bdec"])
def test_saelens_checkpoint_reads_back(variant: str, tmp_path) -> None:
    pytest.importorskip("sae_lens")
    from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    if variant.startswith("topk"):
        cfg = TopKSAEConfig(d_in=D_IN, d_sae=N_LAT, k=K, rescale_acts_by_decoder_norm=variant == "topk-rescaled")
        writer = TopKSAE(cfg)
    else:
        cfg = StandardSAEConfig(d_in=D_IN, d_sae=N_LAT, apply_b_dec_to_input=variant == "standard")
        writer = StandardSAE(cfg)
    _randomise(writer, 1)
    writer.save_model(tmp_path / variant)
    reread = SAE.load_from_disk(tmp_path / variant)
    dirs = load_directions(tmp_path / variant)
    np.testing.assert_array_equal(dirs.encoder, writer.W_enc.detach().numpy().T)
    np.testing.assert_array_equal(dirs.decoder, writer.W_dec.detach().numpy())
    ours = load_sae(tmp_path / variant)
    x = _inputs(seed=2)
    with torch.no_grad():
        acts, recon = reread.encode(x), reread.decode(reread.encode(x))
        mine = ours(x)
    torch.testing.assert_close(mine["x_hat"], recon, atol=1e-5, rtol=1e-5)
    if variant.startswith("standard"):
        torch.testing.assert_close(mine["latents"], acts, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(acts.topk(K, dim=1).indices.sort(dim=1).values, mine["indices"])
    via_object = sae_from_object(writer)
    with torch.no_grad():
        torch.testing.assert_close(via_object(x)["x_hat"], recon, atol=1e-5, rtol=1e-5)


def test_our_export_loads_in_saelens(tmp_path) -> None:
    pytest.importorskip("sae_lens")
    from sae_lens import SAE

    sae = _trained_like(2, input_scale=0.5)
    export = export_sae(sae, tmp_path / "lens", layout="saelens", hook_name="blocks.3.hook_mlp_out")
    lens = SAE.load_from_disk(export)
    assert lens.cfg.architecture() == "topk" and lens.cfg.k == K
    raw = _inputs(500, seed=4, scale=2.0)
    with torch.no_grad():
        recon = lens.decode(lens.encode(raw))
        mine = sae(raw * 0.5)
    torch.testing.assert_close(recon, mine["x_hat"] / 0.5, atol=1e-4, rtol=1e-4)
    # and back: directions equal, FVU on raw activations equal to ours
    back = load_sae(export)
    assert evaluate_sae(back, raw.numpy())["fvu"] == pytest.approx(evaluate_sae(sae, raw.numpy())["fvu"], rel=1e-5)
