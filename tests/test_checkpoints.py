"""Checkpoint layouts: our sparsify writer/reader, SAELens and dictionary_learning orientation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from replication.sae.architectures import build_sae
from replication.sae.checkpoints import detect_layout, load_directions, load_sae, read_training_info, save_sae

D_IN, N = 6, 10   # non-square on purpose: a transposed read cannot go unnoticed


def _known() -> tuple[np.ndarray, np.ndarray]:
    """Encoder / decoder rows with recognisable entries: row i, column j holds i + j/10 (+100 for decoder)."""
    enc = (np.arange(N)[:, None] + np.arange(D_IN)[None, :] / 10).astype(np.float32)
    return enc, enc + 100


@pytest.mark.parametrize("arch", ["topk", "relu", "gated", "jumprelu"])
def test_round_trip_all_architectures(arch: str, tmp_path) -> None:
    sae = build_sae(arch, D_IN, N, k=3, seed=4, input_scale=0.5)
    folder = save_sae(sae, tmp_path / "run", "layers.3", {"seed": 4, "data_hash": "abc"})
    assert folder == tmp_path / "run" / "layers.3"
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("d_in", "num_latents", "k", "expansion_factor", "normalize_decoder", "multi_topk",
                "skip_connection", "architecture"):
        assert key in cfg
    info = read_training_info(tmp_path / "run")          # a run dir with one hookpoint is accepted
    assert info["data_hash"] == "abc" and len(info["sae_sha256"]) == 64
    loaded = load_sae(tmp_path / "run")
    assert type(loaded) is type(sae) and loaded.input_scale == 0.5
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    dirs = load_directions(folder)
    np.testing.assert_array_equal(dirs.encoder, sae.encoder.weight.detach().numpy())
    np.testing.assert_array_equal(dirs.decoder, sae.W_dec.detach().numpy())


def test_sparsify_tensor_names_and_dtype_from_file(tmp_path) -> None:
    sae = build_sae("topk", D_IN, N, k=3, seed=0, dtype=torch.float64)
    folder = save_sae(sae, tmp_path, "h")
    from safetensors import safe_open

    with safe_open(str(folder / "sae.safetensors"), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert shapes == {"encoder.weight": (N, D_IN), "encoder.bias": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,)}
    assert load_sae(folder).dtype == torch.float64


def test_checksum_mismatch_and_corruption_name_the_file(tmp_path) -> None:
    folder = save_sae(build_sae("topk", D_IN, N, k=3, seed=0), tmp_path, "h")
    weights = folder / "sae.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch.*sae.safetensors"):
        load_sae(folder)
    weights.write_bytes(b"not a safetensors file")
    (folder / "training.json").unlink()
    with pytest.raises(ValueError, match="sae.safetensors"):
        load_sae(folder)


def test_third_party_sparsify_folder_with_unknown_key(tmp_path) -> None:
    enc, dec = _known()
    save_file({"encoder.weight": torch.from_numpy(enc), "encoder.bias": torch.zeros(N),
               "W_dec": torch.from_numpy(dec), "b_dec": torch.zeros(D_IN)}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": N,
                                                   "k": 3, "signed": False, "d_in": D_IN}))
    with pytest.warns(UserWarning, match="signed"):
        sae = load_sae(tmp_path)
    assert sae.architecture == "topk" and sae.k == 3
    with pytest.warns(UserWarning, match="signed"):
        dirs = load_directions(tmp_path)
    assert detect_layout(tmp_path)[0] == "sparsify"
    np.testing.assert_array_equal(dirs.encoder, enc)
    np.testing.assert_array_equal(dirs.decoder, dec)


def test_saelens_layout_transposes_w_enc(tmp_path) -> None:
    enc, dec = _known()
    save_file({"W_enc": torch.from_numpy(enc.T.copy()), "b_enc": torch.zeros(N), "W_dec": torch.from_numpy(dec),
               "b_dec": torch.zeros(D_IN), "b_gate": torch.zeros(N), "r_mag": torch.zeros(N), "b_mag": torch.zeros(N)},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": N, "architecture": "gated"}))
    dirs = load_directions(tmp_path)
    assert dirs.meta["layout"] == "saelens" and dirs.meta["architecture"] == "gated"
    np.testing.assert_array_equal(dirs.encoder, enc)
    np.testing.assert_array_equal(dirs.decoder, dec)


@pytest.mark.parametrize("variant", ["standard", "jumprelu"])
def test_dictionary_learning_layout(variant: str, tmp_path) -> None:
    enc, dec = _known()
    if variant == "standard":   # encoder.weight rows, decoder.weight columns
        state = {"encoder.weight": torch.from_numpy(enc), "encoder.bias": torch.zeros(N),
                 "decoder.weight": torch.from_numpy(dec.T.copy()), "bias": torch.zeros(D_IN)}
    else:                       # JumpReluAutoEncoder: W_enc columns, W_dec rows
        state = {"W_enc": torch.from_numpy(enc.T.copy()), "b_enc": torch.zeros(N), "W_dec": torch.from_numpy(dec),
                 "b_dec": torch.zeros(D_IN), "threshold": torch.zeros(N)}
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"activation_dim": D_IN, "dict_size": N,
                                                                  "dict_class": "AutoEncoder"}}))
    dirs = load_directions(tmp_path / "ae.pt")
    assert dirs.meta["layout"] == "dictionary_learning"
    np.testing.assert_array_equal(dirs.encoder, enc)
    np.testing.assert_array_equal(dirs.decoder, dec)


def test_unrecognised_and_ambiguous_folders(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unrecognised SAE folder.*sae.safetensors.*sae_weights.*ae.pt"):
        load_directions(tmp_path)
    for hook in ("a", "b"):
        save_sae(build_sae("topk", D_IN, N, k=3, seed=0), tmp_path, hook)
    with pytest.raises(ValueError, match="several SAEs"):
        load_directions(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_directions(tmp_path / "missing")
