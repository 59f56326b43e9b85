"""SAE checkpoints on disk: write the `sparsify` layout, read it plus SAELens and dictionary_learning.

Layout written (SPEC section 6)::

    <run_dir>/<hookpoint>/cfg.json          sparsify keys + architecture (+ input_scale)
    <run_dir>/<hookpoint>/sae.safetensors   encoder.weight [n, d_in], encoder.bias [n],
                                            W_dec [n, d_in], b_dec [d_in] (+ b_gate, b_mag,
                                            r_mag for Gated, log_threshold for JumpReLU)
    <run_dir>/<hookpoint>/training.json     configs, seed, data hash, metrics, sha256 of the
                                            safetensors file (written last: marks completion)

Every file is written atomically. `load_sae` verifies the sha256 recorded in training.json
(when there is one: third-party sparsify folders have none). `load_directions` reads any of
the three libraries' layouts and always returns rows = latents.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .directions import LatentDirections
from .io import atomic_path, read_json, sha256_file, write_json_atomic
from .sae import SAEBase, build_sae

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
TRAINING_INFO = "training.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
DICTLEARN_WEIGHTS = "ae.pt"
DICTLEARN_CFG = "config.json"

KNOWN_CFG_KEYS = {
    "architecture", "activation", "d_in", "num_latents", "k", "expansion_factor", "normalize_decoder",
    "multi_topk", "skip_connection", "transcode", "input_scale", "bandwidth", "init_threshold",
}

_LAYOUT_HELP = (
    f"{SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify), {SPARSIFY_CFG} + {SAELENS_WEIGHTS} (SAELens), "
    f"{DICTLEARN_WEIGHTS} + {DICTLEARN_CFG} (dictionary_learning)"
)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def save_sae(sae: SAEBase, run_dir: Path | str, hookpoint: str = "layer",
             training_info: dict[str, Any] | None = None) -> Path:
    """Write `sae` in the sparsify layout under `<run_dir>/<hookpoint>/`; return that folder.

    `training_info` (configs, seed, data hash, metrics, ...) goes to training.json together with
    the sha256 of the safetensors file; training.json is written last, so its presence means the
    checkpoint is complete.
    """
    from safetensors.torch import save_file

    folder = Path(run_dir) / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    with atomic_path(folder / SPARSIFY_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": sae.architecture})
    write_json_atomic(folder / SPARSIFY_CFG, sae.cfg_dict())
    info = dict(training_info or {})
    info["sae_sha256"] = sha256_file(folder / SPARSIFY_WEIGHTS)
    info.setdefault("written_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    info.setdefault("torch_version", torch.__version__)
    write_json_atomic(folder / TRAINING_INFO, info)
    return folder


# ----------------------------------------------------------------------------------------------
# layout detection
# ----------------------------------------------------------------------------------------------
def detect_layout(path: Path | str) -> tuple[str, Path]:
    """(layout, folder) for an SAE folder, a file inside one, or a run dir with one hookpoint.

    layout is "sparsify", "saelens" or "dictionary_learning".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE path does not exist: {path}")
    if path.is_file():
        path = path.parent
    layout = _layout_of(path)
    if layout is not None:
        return layout, path
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _layout_of(p) is not None)
    if len(subdirs) == 1:
        return _layout_of(subdirs[0]), subdirs[0]  # type: ignore[return-value]
    if len(subdirs) > 1:
        raise ValueError(f"{path} holds several SAEs ({', '.join(p.name for p in subdirs)}); pass one of them")
    found = sorted(p.name for p in path.iterdir())
    raise ValueError(f"unrecognised SAE folder {path}: expected one of: {_LAYOUT_HELP}; found: {found}")


def _layout_of(folder: Path) -> str | None:
    if (folder / SPARSIFY_WEIGHTS).exists() and (folder / SPARSIFY_CFG).exists():
        return "sparsify"
    if (folder / SAELENS_WEIGHTS).exists():
        return "saelens"
    if (folder / DICTLEARN_WEIGHTS).exists():
        return "dictionary_learning"
    return None


def read_training_info(path: Path | str) -> dict[str, Any] | None:
    """training.json of a checkpoint folder written by `save_sae`, or None if absent."""
    _, folder = detect_layout(path)
    info_path = folder / TRAINING_INFO
    return read_json(info_path) if info_path.exists() else None


# ----------------------------------------------------------------------------------------------
# reading our (sparsify) layout
# ----------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type on corrupt headers/data
        raise ValueError(f"cannot read {path}: corrupt or not a safetensors file ({err})") from err


def verify_checksum(folder: Path | str) -> None:
    """Compare sae.safetensors against the sha256 in training.json (no-op when none recorded)."""
    folder = Path(folder)
    info_path = folder / TRAINING_INFO
    if not info_path.exists():
        return
    expected = read_json(info_path).get("sae_sha256")
    if not expected:
        return
    actual = sha256_file(folder / SPARSIFY_WEIGHTS)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch for {folder / SPARSIFY_WEIGHTS}: training.json records {expected[:16]}..., "
            f"file has {actual[:16]}... (file corrupted or replaced)"
        )


def _read_sparsify_cfg(folder: Path) -> dict[str, Any]:
    cfg_path = folder / SPARSIFY_CFG
    cfg = read_json(cfg_path)
    unknown = sorted(set(cfg) - KNOWN_CFG_KEYS)
    if unknown:
        warnings.warn(f"ignoring unknown cfg keys {unknown} in {cfg_path}", stacklevel=3)
    return cfg


def load_sae(path: Path | str, device: str | torch.device = "cpu", *, verify: bool = True) -> SAEBase:
    """Load a sparsify-layout SAE (ours or EleutherAI's) as one of the `sae` module classes.

    dtype comes from the file; the checksum in training.json is checked when `verify`.
    """
    layout, folder = detect_layout(path)
    if layout != "sparsify":
        raise ValueError(f"load_sae reads the sparsify layout; {folder} is {layout} (use load_directions)")
    if verify:
        verify_checksum(folder)
    cfg = _read_sparsify_cfg(folder)
    weights_path = folder / SPARSIFY_WEIGHTS
    tensors = _read_safetensors(weights_path)
    if cfg.get("skip_connection") or cfg.get("transcode") or "W_skip" in tensors:
        raise NotImplementedError(f"{folder}: sparsify skip connections / transcoders are not supported by load_sae "
                                  f"(load_directions still reads their directions)")
    if "W_dec" not in tensors or "encoder.weight" not in tensors:
        raise ValueError(f"{weights_path} lacks encoder.weight / W_dec; has {sorted(tensors)}")
    d_in = int(cfg.get("d_in") or tensors["W_dec"].shape[1])
    n_latents = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor") or 0)
    if n_latents <= 0:
        n_latents = int(tensors["W_dec"].shape[0])
    architecture = cfg.get("architecture") or ("topk" if cfg.get("k") else "relu")
    dtype = next(iter(tensors.values())).dtype
    extra = {key: cfg[key] for key in ("bandwidth", "init_threshold") if key in cfg}
    sae = build_sae(architecture, d_in, n_latents, k=cfg.get("k"), device="cpu", dtype=dtype,
                    normalize_decoder=cfg.get("normalize_decoder", True), input_scale=float(cfg.get("input_scale", 1.0)),
                    **extra)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if set(expected) != set(got):
        raise ValueError(f"{weights_path}: tensors {sorted(got)} do not match a {architecture} SAE ({sorted(expected)})")
    bad = {name: (got[name], shape) for name, shape in expected.items() if got[name] != shape}
    if bad:
        raise ValueError(f"{weights_path}: shape mismatch (file, expected): {bad}")
    sae.load_state_dict(tensors)
    return sae.to(device)


# ----------------------------------------------------------------------------------------------
# directions from any layout
# ----------------------------------------------------------------------------------------------
def _rows(matrix: torch.Tensor | np.ndarray, n_latents: int | None, d_in: int | None, *, columns: bool,
          what: str) -> np.ndarray:
    """Orient `matrix` to `[n_latents, d_in]`; `columns` is the library convention (directions in columns)."""
    arr = np.asarray(matrix.float().numpy() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D weight, got shape {arr.shape}")
    rows = arr.T if columns else arr
    if n_latents is not None and d_in is not None and rows.shape != (n_latents, d_in):
        if rows.T.shape == (n_latents, d_in):
            warnings.warn(f"{what}: shape {arr.shape} is transposed relative to the library convention; "
                          f"using config sizes (n_latents={n_latents}, d_in={d_in})", stacklevel=3)
            rows = rows.T
        else:
            raise ValueError(f"{what}: shape {arr.shape} fits neither [{n_latents}, {d_in}] nor its transpose")
    return np.ascontiguousarray(rows)


def load_directions(path: Path | str, name: str | None = None) -> LatentDirections:
    """Encoder and decoder directions (rows = latents) from a sparsify, SAELens or dictionary_learning folder."""
    layout, folder = detect_layout(path)
    display = name if name is not None else f"{folder.parent.name}/{folder.name}"
    meta: dict[str, Any] = {"layout": layout, "path": str(folder)}
    if layout == "sparsify":
        verify_checksum(folder)
        cfg = _read_sparsify_cfg(folder)
        tensors = _read_safetensors(folder / SPARSIFY_WEIGHTS)
        d_in = cfg.get("d_in")
        n = cfg.get("num_latents") or (d_in * cfg["expansion_factor"] if d_in and cfg.get("expansion_factor") else None)
        what = str(folder / SPARSIFY_WEIGHTS)
        encoder = _rows(tensors["encoder.weight"], n, d_in, columns=False, what=what + " encoder.weight")
        decoder = _rows(tensors["W_dec"], n, d_in, columns=False, what=what + " W_dec")
        meta.update({"architecture": cfg.get("architecture", "topk"), "k": cfg.get("k"), "input_scale": cfg.get("input_scale", 1.0)})
        info_path = folder / TRAINING_INFO
        if info_path.exists():
            info = read_json(info_path)
            meta.update({"seed": info.get("seed"), "data_hash": info.get("data_hash"), "metrics": info.get("metrics")})
    elif layout == "saelens":
        cfg_path = folder / SPARSIFY_CFG
        cfg = read_json(cfg_path) if cfg_path.exists() else {}
        weights = folder / SAELENS_WEIGHTS
        tensors = _read_safetensors(weights)
        if "W_enc" not in tensors or "W_dec" not in tensors:
            raise ValueError(f"{weights} lacks W_enc / W_dec; has {sorted(tensors)}")
        d_in, n = cfg.get("d_in"), cfg.get("d_sae")
        encoder = _rows(tensors["W_enc"], n, d_in, columns=True, what=f"{weights} W_enc")
        decoder = _rows(tensors["W_dec"], n, d_in, columns=False, what=f"{weights} W_dec")
        meta.update({"architecture": cfg.get("architecture", "standard"), "k": cfg.get("k")})
    else:
        weights = folder / DICTLEARN_WEIGHTS
        cfg_path = folder / DICTLEARN_CFG
        cfg = read_json(cfg_path) if cfg_path.exists() else {}
        trainer = cfg.get("trainer", cfg) if isinstance(cfg, dict) else {}
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read {weights}: {err}") from err
        if not isinstance(state, dict):
            raise ValueError(f"{weights}: expected a state dict, got {type(state).__name__}")
        d_in, n = trainer.get("activation_dim"), trainer.get("dict_size")
        if "encoder.weight" in state and "decoder.weight" in state:
            encoder = _rows(state["encoder.weight"], n, d_in, columns=False, what=f"{weights} encoder.weight")
            decoder = _rows(state["decoder.weight"], n, d_in, columns=True, what=f"{weights} decoder.weight")
        elif "W_enc" in state and "W_dec" in state:  # JumpReluAutoEncoder
            encoder = _rows(state["W_enc"], n, d_in, columns=True, what=f"{weights} W_enc")
            decoder = _rows(state["W_dec"], n, d_in, columns=False, what=f"{weights} W_dec")
        else:
            raise ValueError(f"{weights}: no encoder.weight/decoder.weight or W_enc/W_dec; has {sorted(state)}")
        meta.update({"architecture": trainer.get("dict_class", "dictionary_learning"), "k": trainer.get("k")})
    if encoder.shape != decoder.shape:
        raise ValueError(f"{folder}: encoder {encoder.shape} and decoder {decoder.shape} directions disagree")
    meta.update({"d_in": int(encoder.shape[1]), "n_latents": int(encoder.shape[0])})
    return LatentDirections(encoder, decoder, name=display, meta=meta)
