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

`load_sae` also reads SAELens and dictionary_learning folders as whole SAEs, and
`sae_from_object` converts in-memory SAEs of those libraries (`sae_from_state_dict`: orientation
by shape, b_dec folded where a library does not subtract it). Corrupt files and NaN weights are
refused with the file's name. `export_sae` writes a checkpoint that sparsify's
`SparseCoder.load_from_disk` or SAELens' `SAE.load_from_disk` reads, with our `input_scale`
folded into the weights (`fold_input_scale`), because both libraries drop that key.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path, read_json, sha256_file, write_json_atomic
from .architectures import UNIT_NORM_DECODER, SAEBase, build_sae
from .directions import LatentDirections

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
def seed_dir(family_root: Path | str, seed: int) -> Path:
    """A family's run folder for one seed: `<family_root>/seed<seed>/` (sparsify's run dir; intermediate
    checkpoints and the resume state live there too)."""
    return Path(family_root) / f"seed{seed}"


def seed_folder(family_root: Path | str, seed: int, hook: str) -> Path:
    """Where a family's seed keeps its final checkpoint: `<family_root>/seed<seed>/<hook>/` (the sparsify layout)."""
    return seed_dir(family_root, seed) / hook


def is_finished(folder: Path | str) -> bool:
    """A final checkpoint exists in `folder` (its weights file is written last, atomically)."""
    return (Path(folder) / SPARSIFY_WEIGHTS).exists()


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
        # one metadata key: safetensors writes a map's keys in a per-process random order, so two keys would
        # make equal SAEs differ in file bytes (and sae_sha256) between processes; the architecture is in cfg.json
        save_file(tensors, str(tmp), metadata={"format": "pt"})
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
    """Load an SAE folder of any of the three layouts as one of the `sae` module classes.

    sparsify (ours or EleutherAI's): dtype from the file, the checksum in training.json checked
    when `verify`. SAELens and dictionary_learning: converted by `sae_from_state_dict`, so that
    `encode`/`decode` equal the writing library's (their FVU and firing counts can be measured).
    Non-finite weights are refused with a message naming the file and tensors.
    """
    layout, folder = detect_layout(path)
    if layout == "saelens":
        cfg_path = folder / SPARSIFY_CFG
        cfg = read_json(cfg_path) if cfg_path.exists() else {}
        tensors = _read_safetensors(folder / SAELENS_WEIGHTS)
        _check_finite(tensors, folder / SAELENS_WEIGHTS)
        return sae_from_state_dict(tensors, cfg, source="saelens", what=str(folder / SAELENS_WEIGHTS)).to(device)
    if layout == "dictionary_learning":
        state, cfg = _read_dictlearn(folder)
        _check_finite(state, folder / DICTLEARN_WEIGHTS)
        return sae_from_state_dict(state, cfg, source="dictionary_learning",
                                   what=str(folder / DICTLEARN_WEIGHTS)).to(device)
    if verify:
        verify_checksum(folder)
    cfg = _read_sparsify_cfg(folder)
    weights_path = folder / SPARSIFY_WEIGHTS
    tensors = _read_safetensors(weights_path)
    _check_finite(tensors, weights_path)
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
        meta.update({"architecture": cfg.get("architecture", "topk"), "k": cfg.get("k"),
                     "input_scale": cfg.get("input_scale", 1.0)})
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
        state, trainer = _read_dictlearn(folder)
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
    _check_finite({"encoder directions": encoder, "decoder directions": decoder}, folder)
    meta.update({"d_in": int(encoder.shape[1]), "n_latents": int(encoder.shape[0])})
    return LatentDirections(encoder, decoder, name=display, meta=meta)


# ----------------------------------------------------------------------------------------------
# whole SAEs from other libraries' tensors (SAELens, dictionary_learning, in-memory objects)
# ----------------------------------------------------------------------------------------------
def _check_finite(tensors: dict[str, Any], where: Path | str) -> None:
    """Refuse NaN / infinite weights with a message naming `where` and each bad tensor."""
    bad = []
    for name, value in tensors.items():
        arr = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if arr.is_floating_point() and arr.numel() and not bool(torch.isfinite(arr).all()):
            bad.append(f"{name} ({int((~torch.isfinite(arr)).sum())} of {arr.numel()} values)")
    if bad:
        raise ValueError(f"{where}: NaN or infinite weights in {', '.join(bad)}; the checkpoint is unusable "
                         f"(training diverged or the file was damaged)")


def _read_dictlearn(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict of ae.pt, trainer config of config.json or {}) of a dictionary_learning folder."""
    weights = folder / DICTLEARN_WEIGHTS
    cfg_path = folder / DICTLEARN_CFG
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    trainer = cfg.get("trainer", cfg) if isinstance(cfg, dict) else {}
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {weights}: corrupt or not a torch state dict ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state dict, got {type(state).__name__}")
    return state, trainer


def _input_width(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], what: str) -> int:
    """d_in from the decoder bias (its only 1-D tensor of input width), else from the config."""
    for name in ("b_dec", "bias", "decoder_bias", "decoder.bias"):
        if name in tensors and tensors[name].ndim == 1:
            return int(tensors[name].shape[0])
    for key in ("d_in", "activation_dim"):
        if cfg.get(key):
            return int(cfg[key])
    raise ValueError(f"{what}: cannot tell the input width (no b_dec / bias tensor and no d_in in the config)")


def _orient(matrix: torch.Tensor, d_in: int, *, columns: bool, what: str) -> torch.Tensor:
    """`matrix` as `[n_latents, d_in]`, decided by shape (the axis of length d_in is the input);
    `columns` (the library's convention) only settles square matrices."""
    if matrix.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D weight, got shape {tuple(matrix.shape)}")
    rows_fit, cols_fit = matrix.shape[1] == d_in, matrix.shape[0] == d_in
    if rows_fit and cols_fit:
        return (matrix.T if columns else matrix).contiguous()
    if rows_fit:
        return matrix.contiguous()
    if cols_fit:
        return matrix.T.contiguous()
    raise ValueError(f"{what}: shape {tuple(matrix.shape)} has no axis of the input width {d_in}")


def _as_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: (value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)))
            for name, value in state.items()}


def sae_from_state_dict(state: dict[str, Any], cfg: dict[str, Any] | None = None, *, source: str | None = None,
                        what: str = "state dict") -> SAEBase:
    """Our SAE class whose `encode`/`decode` equal those of a sparsify, SAELens or dictionary_learning SAE.

    `state` is the library's state dict (tensor names as the library writes them); `cfg` its
    config (SAELens cfg.json, dictionary_learning's trainer config) for k and flags. `source`
    ("sparsify", "saelens", "dictionary_learning") is guessed from the tensor names when None.
    Orientation is decided by shape against the decoder bias's width; the library convention
    only settles square matrices. Where a library does not subtract `b_dec` before encoding,
    `W_enc b_dec` is folded into the encoder bias (same pre-activations, our equations).
    """
    cfg = dict(cfg or {})
    t = _as_tensors(state)
    _check_finite(t, what)
    if source is None:
        if "W_enc" in t:
            source = "saelens"                      # also dictionary_learning's JumpReluAutoEncoder
        elif "encoder.weight" in t and "W_dec" in t:
            source = "sparsify"
        elif "encoder.weight" in t and "decoder.weight" in t:
            source = "dictionary_learning"
        else:
            raise ValueError(f"{what}: tensors {sorted(t)} match no known SAE (expected W_enc/W_dec, "
                             f"encoder.weight/W_dec or encoder.weight/decoder.weight)")
    d_in = _input_width(t, cfg, what)
    dtype = t["W_dec"].dtype if "W_dec" in t else t["decoder.weight"].dtype
    folded = False                                  # True: b_dec is not subtracted before encoding
    extra: dict[str, torch.Tensor] = {}
    k = None
    if source == "sparsify":
        if "W_skip" in t or cfg.get("skip_connection") or cfg.get("transcode"):
            raise NotImplementedError(f"{what}: sparsify skip connections / transcoders are not supported")
        enc = _orient(t["encoder.weight"], d_in, columns=False, what=f"{what} encoder.weight")
        dec = _orient(t["W_dec"], d_in, columns=False, what=f"{what} W_dec")
        b_enc, b_dec = t["encoder.bias"], t["b_dec"]
        architecture, k = "topk", cfg.get("k")
    elif "W_enc" in t:                              # SAELens (and dictionary_learning JumpReLU)
        enc = _orient(t["W_enc"], d_in, columns=True, what=f"{what} W_enc")
        dec = _orient(t["W_dec"], d_in, columns=False, what=f"{what} W_dec")
        b_dec = t["b_dec"]
        arch = str(cfg.get("architecture") or "").lower()
        if source == "saelens":
            folded = not cfg.get("apply_b_dec_to_input", True)
            norm = cfg.get("normalize_activations", "none")
            if norm not in (None, "none"):
                raise NotImplementedError(f"{what}: SAELens normalize_activations={norm!r} is not supported "
                                          f"(fold the scaling factor into the weights first)")
        else:
            folded = not cfg.get("apply_b_dec_to_input", False)   # dictionary_learning's default
        if "b_gate" in t or arch == "gated":
            architecture = "gated"
            extra = {"b_gate": t["b_gate"], "b_mag": t["b_mag"], "r_mag": t["r_mag"]}
            b_enc = None
        elif "threshold" in t or "log_threshold" in t or arch == "jumprelu":
            architecture = "jumprelu"
            log_t = t["log_threshold"] if "log_threshold" in t else \
                torch.log(t["threshold"].clamp_min(torch.finfo(t["threshold"].dtype).tiny))
            extra = {"log_threshold": log_t}
            b_enc = t["b_enc"]
        elif arch == "topk" or cfg.get("k"):
            architecture, k = "topk", cfg.get("k")
            b_enc = t["b_enc"]
        elif arch in ("", "standard", "relu"):
            architecture, b_enc = "relu", t["b_enc"]
        else:
            raise NotImplementedError(f"{what}: SAELens architecture {arch!r} is not supported "
                                      f"(supported: standard, topk, gated, jumprelu)")
    else:                                           # dictionary_learning: decoder.weight is [d_in, n]
        enc = _orient(t["encoder.weight"], d_in, columns=False, what=f"{what} encoder.weight")
        dec = _orient(t["decoder.weight"], d_in, columns=True, what=f"{what} decoder.weight")
        dict_class = str(cfg.get("dict_class") or "")
        if "gate_bias" in t:
            architecture, b_enc, b_dec = "gated", None, t["decoder_bias"]
            extra = {"b_gate": t["gate_bias"], "b_mag": t["mag_bias"], "r_mag": t["r_mag"]}
        elif "b_dec" in t:                          # AutoEncoderTopK / BatchTopKSAE
            b_enc, b_dec = t["encoder.bias"], t["b_dec"]
            k_value = t["k"] if "k" in t else cfg.get("k")
            if "BatchTopK" in dict_class or "threshold" in t:
                # inference: one global threshold on the post-ReLU activations (batch top-k before it is fitted)
                architecture, k = "batchtopk", int(k_value) if k_value is not None else None
                extra = {"threshold": t["threshold"].reshape(()).float()} if "threshold" in t else {}
            else:
                architecture, k = "topk", int(k_value) if k_value is not None else None
        elif "bias" in t:                           # AutoEncoder: x - bias before encoding
            architecture, b_enc, b_dec = "relu", t["encoder.bias"], t["bias"]
        elif "decoder.bias" in t:                   # AutoEncoderNew: no pre-encoder bias
            architecture, b_enc, b_dec, folded = "relu", t["encoder.bias"], t["decoder.bias"], True
        else:
            raise ValueError(f"{what}: dictionary_learning tensors {sorted(t)} match no known dictionary class")
    if architecture in ("topk", "batchtopk") and not k:
        raise ValueError(f"{what}: a {architecture} SAE needs k; none in the tensors or the config")
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens TopK option: pre-activations times decoder norms, decoder rows divided by them
        norms = dec.norm(dim=1).clamp_min(1e-8)
        enc, dec = enc * norms[:, None], dec / norms[:, None]
        b_enc = b_enc * norms
    n_latents = int(enc.shape[0])
    if tuple(dec.shape) != (n_latents, d_in):
        raise ValueError(f"{what}: encoder {tuple(enc.shape)} and decoder {tuple(dec.shape)} disagree")
    sae = build_sae(architecture, d_in, n_latents, k=int(k) if k else None, dtype=dtype,
                    normalize_decoder=architecture in UNIT_NORM_DECODER)
    with torch.no_grad():
        sae.encoder.weight.copy_(enc)
        sae.W_dec.copy_(dec)
        sae.b_dec.copy_(b_dec)
        shift = (enc.double() @ b_dec.double()).to(dtype) if folded else None
        if b_enc is not None:
            sae.encoder.bias.copy_(b_enc + shift if shift is not None else b_enc)
        for name, value in extra.items():
            getattr(sae, name).copy_(value)
        if shift is not None and architecture == "gated":
            sae.b_gate.add_(shift)
            sae.b_mag.add_(torch.exp(sae.r_mag) * shift)
    return sae


def sae_from_object(obj: Any, what: str = "") -> SAEBase:
    """Our SAE equal to an in-memory SAE: ours (returned as is), a sparsify `SparseCoder`, a SAELens
    `SAE` or a dictionary_learning `Dictionary` (anything with a `state_dict` of those names)."""
    if isinstance(obj, SAEBase):
        return obj
    if not hasattr(obj, "state_dict"):
        raise TypeError(f"{what or type(obj).__name__}: not an SAE (no state_dict); pass a path, our SAE, a "
                        f"sparsify SparseCoder, a SAELens SAE, a dictionary_learning AutoEncoder or LatentDirections")
    cfg: dict[str, Any] = {}
    raw_cfg = getattr(obj, "cfg", None)
    if raw_cfg is not None:
        cfg = raw_cfg.to_dict() if hasattr(raw_cfg, "to_dict") else dict(getattr(raw_cfg, "__dict__", {}))
        cfg.setdefault("architecture", raw_cfg.architecture() if callable(getattr(raw_cfg, "architecture", None))
                       else cfg.get("architecture"))
    for attr in ("k", "apply_b_dec_to_input"):
        value = getattr(obj, attr, None)
        if attr not in cfg and isinstance(value, (int, bool, torch.Tensor)):
            cfg[attr] = int(value) if attr == "k" else bool(value)
    module = type(obj).__module__.split(".")[0]
    source = {"sparsify": "sparsify", "sae_lens": "saelens", "dictionary_learning": "dictionary_learning"}.get(module)
    if source == "dictionary_learning":
        cfg.setdefault("dict_class", type(obj).__name__)
        cfg.setdefault("apply_b_dec_to_input", bool(getattr(obj, "apply_b_dec_to_input", False)))
    return sae_from_state_dict(obj.state_dict(), cfg, source=source, what=what or type(obj).__name__)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def fold_input_scale(sae: SAEBase) -> SAEBase:
    """A copy of `sae` that takes raw activations: `input_scale` folded into the weights.

    Our SAEs see `s * x`. Every architecture is positively homogeneous in its biases, so dividing
    `b_dec`, the encoder biases (and the JumpReLU threshold) by `s` gives pre-activations and latents
    divided by `s` -- the same top-k indices -- and a reconstruction of `x` itself, while the decoder
    rows keep their (unit) norms. FVU is unchanged.
    """

    out = copy.deepcopy(sae)
    s = float(sae.input_scale)
    if s <= 0 or not np.isfinite(s):
        raise ValueError(f"input_scale must be positive and finite, got {s}")
    with torch.no_grad():
        for name in ("b_dec", "encoder.bias", "b_gate", "b_mag"):
            param = out.get_parameter(name) if _has_param(out, name) else None
            if param is not None:
                param.div_(s)
        if _has_param(out, "log_threshold"):
            out.log_threshold.sub_(math.log(s))
    out.input_scale = 1.0
    return out


def _has_param(module: torch.nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False


EXPORT_LAYOUTS = ("sparsify", "saelens")


def export_sae(sae: SAEBase | Path | str, out_dir: Path | str, layout: str = "sparsify", *,
               hook_name: str = "", fold_scale: bool = True) -> Path:
    """Write `sae` (or the checkpoint at a path) so the other library loads it; return the folder.

    `sparsify`: `cfg.json` with only `SparseCoderConfig` keys plus `d_in`, and `sae.safetensors`
    (TopK only), readable by `SparseCoder.load_from_disk`. `saelens`: `cfg.json` +
    `sae_weights.safetensors` (`W_enc [d_in, d_sae]`) readable by `sae_lens.SAE.load_from_disk`.
    With `fold_scale` the input scale is folded into the weights (`fold_input_scale`), so the
    exported SAE takes raw activations: sparsify and SAELens drop our `input_scale` key.
    Both files are written atomically; the folder is created if missing.
    """
    from safetensors.torch import save_file

    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown export layout {layout!r}; choose one of {EXPORT_LAYOUTS}")
    if not isinstance(sae, SAEBase):
        sae = load_sae(sae)
    sae = fold_input_scale(sae) if fold_scale else sae
    if not fold_scale and sae.input_scale != 1.0:
        warnings.warn(f"exporting with input_scale {sae.input_scale} not folded: the other library will "
                      f"apply these weights to unscaled inputs", stacklevel=2)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().to("cpu").contiguous() for name, p in sae.state_dict().items()}
    if layout == "sparsify":
        if sae.architecture != "topk":
            raise ValueError(f"sparsify only has TopK SAEs; this SAE is {sae.architecture!r} (export to saelens)")
        cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in),
               "normalize_decoder": sae.normalize_decoder, "num_latents": sae.n_latents, "k": int(sae.k),
               "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in}
        tensors, weights_name = state, SPARSIFY_WEIGHTS
    else:
        tensors = {"W_enc": state["encoder.weight"].T.contiguous(), "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
        architecture = {"topk": "topk", "relu": "standard", "gated": "gated", "jumprelu": "jumprelu"}[sae.architecture]
        if "encoder.bias" in state:
            tensors["b_enc"] = state["encoder.bias"]
        if sae.architecture == "gated":
            tensors.update({name: state[name] for name in ("b_gate", "b_mag", "r_mag")})
        if sae.architecture == "jumprelu":
            tensors["threshold"] = torch.exp(state["log_threshold"])
        cfg = {"architecture": architecture, "d_in": sae.d_in, "d_sae": sae.n_latents,
               "dtype": str(sae.dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"hook_name": hook_name}}
        if sae.architecture == "topk":
            cfg["k"] = int(sae.k)
        weights_name = SAELENS_WEIGHTS
    with atomic_path(folder / weights_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / SPARSIFY_CFG, cfg)
    return folder
