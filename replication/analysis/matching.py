"""Optimal one-to-one matching of the latents of two SAEs (SPEC section 2).

Each latent is an encoder row and a decoder row, L2-normalised. For two SAEs of the same
size, `C = A @ B.T` holds the cosines (rows = base SAE) and the matching is the bijection
that maximises the summed cosine -- the Hungarian / linear-sum-assignment problem, solved
**separately** for the decoder and for the encoder. `assignment.solve_assignment` solves it exactly
(scipy's `linear_sum_assignment` is the reference; see `assignment` for the fast certified path).

Matching results are cached as `.npz` (plus a JSON sidecar with the settings and the
npz's SHA-256) under `paths.MATCHINGS_DIR`, keyed by both SAEs' content hashes and
`METHOD_VERSION`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import paths
from ..io import atomic_path, read_json, sha256_file, write_json_atomic
from ..sae.directions import LatentDirections
from .assignment import solve_assignment_detailed, top2

METHOD_VERSION = "hungarian-sep-v1"
DEFAULT_THRESHOLD = 0.7
DEFINITIONS: tuple[str, ...] = ("threshold", "agree", "decoder", "maxcos")


# --------------------------------------------------------------------------- cosines
def unit_rows(W: np.ndarray) -> np.ndarray:
    """Rows of `W` scaled to unit L2 norm (float32). Zero rows stay zero, so cosines with
    a dead latent are 0, never NaN."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D [n_latents, d_in] array, got shape {W.shape}")
    W64 = W.astype(np.float64, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", W64, W64))
    scale = np.zeros_like(norms)
    np.divide(1.0, norms, out=scale, where=norms > 0)
    return (W64 * scale[:, None]).astype(np.float32)


def cosine_matrix(
    A: np.ndarray,
    B: np.ndarray,
    out: np.ndarray | None = None,
    block_rows: int = 2048,
    normalized: bool = False,
) -> np.ndarray:
    """Cosine matrix ``unit(A) @ unit(B).T`` (float32, rows = A), computed in row blocks into
    `out` (reused when given) and clipped to [-1, 1]. `normalized=True` skips normalising."""
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"cosine_matrix needs [n, d] and [m, d] arrays, got {A.shape} and {B.shape}")
    Au = np.ascontiguousarray(A, dtype=np.float32) if normalized else unit_rows(A)
    Bu = np.ascontiguousarray(B, dtype=np.float32) if normalized else unit_rows(B)
    shape = (Au.shape[0], Bu.shape[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"`out` must be a C-contiguous float32 array of shape {shape}")
    BuT = Bu.T
    for start in range(0, shape[0], block_rows):
        blk = out[start:start + block_rows]
        np.matmul(Au[start:start + block_rows], BuT, out=blk)
        np.clip(blk, -1.0, 1.0, out=blk)
    return out


# --------------------------------------------------------------------------- SAE matching
class MatchCacheError(ValueError):
    """A cached matching file is missing its sidecar, corrupt, or does not fit the SAEs."""


@dataclass
class MatchResult:
    """Decoder and encoder matchings (each an optimal bijection of its own) of SAE `a`
    (base, rows) to SAE `b`, plus the max-cosine baseline in both directions.

    Per base latent i: `dec_partner[i]` / `dec_cos[i]` (and enc_*) are the matched latent
    of b and its cosine; `dec_max_cos[i]` / `dec_max_partner[i]` the row maximum of the
    decoder cosine matrix and where it is (Braun et al.'s baseline, no bijection). The
    `*_rev` arrays are the same baseline seen from b (column maxima), because the max
    cosine is not symmetric; `inverse()` uses them to give b -> a.
    """

    a_name: str
    b_name: str
    a_hash: str
    b_hash: str
    dec_partner: np.ndarray
    dec_cos: np.ndarray
    enc_partner: np.ndarray
    enc_cos: np.ndarray
    dec_max_cos: np.ndarray
    dec_max_partner: np.ndarray
    enc_max_cos: np.ndarray
    enc_max_partner: np.ndarray
    dec_max_cos_rev: np.ndarray
    dec_max_partner_rev: np.ndarray
    enc_max_cos_rev: np.ndarray
    enc_max_partner_rev: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    ARRAYS = ("dec_partner", "dec_cos", "enc_partner", "enc_cos", "dec_max_cos", "dec_max_partner",
              "enc_max_cos", "enc_max_partner", "dec_max_cos_rev", "dec_max_partner_rev",
              "enc_max_cos_rev", "enc_max_partner_rev")

    @property
    def n_latents(self) -> int:
        return int(len(self.dec_partner))

    @property
    def dec_total(self) -> float:
        """Summed matched decoder cosine (exactly rounded)."""
        return math.fsum(self.dec_cos.astype(np.float64).tolist())

    @property
    def enc_total(self) -> float:
        """Summed matched encoder cosine (exactly rounded)."""
        return math.fsum(self.enc_cos.astype(np.float64).tolist())

    def inverse(self) -> "MatchResult":
        """The same matching seen from b (b's latents as rows): permutations inverted,
        cosines carried along, max-cosine baseline swapped with its reverse direction."""
        n = self.n_latents

        def inv(partner: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p = np.empty(n, np.int64)
            p[partner] = np.arange(n)
            c = np.empty_like(cos)
            c[partner] = cos
            return p, c

        dp, dc = inv(self.dec_partner, self.dec_cos)
        ep, ec = inv(self.enc_partner, self.enc_cos)
        return MatchResult(
            self.b_name, self.a_name, self.b_hash, self.a_hash, dp, dc, ep, ec,
            self.dec_max_cos_rev, self.dec_max_partner_rev, self.enc_max_cos_rev, self.enc_max_partner_rev,
            self.dec_max_cos, self.dec_max_partner, self.enc_max_cos, self.enc_max_partner,
            info={**self.info, "inverted": not self.info.get("inverted", False)},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.ARRAYS}


def _validate_pair(a: LatentDirections, b: LatentDirections) -> None:
    if a.d_in != b.d_in:
        raise ValueError(
            f"SAEs have different input widths (d_in {a.d_in} for {a.name or 'a'!r} vs {b.d_in} for "
            f"{b.name or 'b'!r}); latent directions can only be compared for SAEs trained on the same "
            "activations (same model and hookpoint)."
        )
    if a.n_latents != b.n_latents:
        raise ValueError(
            f"SAEs have different numbers of latents ({a.n_latents} for {a.name or 'a'!r} vs {b.n_latents} "
            f"for {b.name or 'b'!r}); the paper's matching is a square bijection (Hungarian algorithm) "
            "between two SAEs of the same size -- compare SAEs with the same number of latents."
        )
    for d, tag in ((a, "a"), (b, "b")):
        for part in ("encoder", "decoder"):
            W = getattr(d, part)
            if not np.isfinite(W).all():
                bad = int((~np.isfinite(W)).any(axis=1).sum())
                raise ValueError(f"SAE {d.name or tag!r}: {bad} {part} rows contain NaN or infinite weights")


def _cache_paths(cache_dir: Path, a_hash: str, b_hash: str) -> tuple[Path, Path]:
    stem = f"{a_hash}__{b_hash}__{METHOD_VERSION}"
    return cache_dir / f"{stem}.npz", cache_dir / f"{stem}.json"


def _expected_settings(a: LatentDirections, b: LatentDirections) -> dict[str, Any]:
    return {"a_hash": a.content_hash, "b_hash": b.content_hash, "n_latents": a.n_latents,
            "d_in": a.d_in, "method_version": METHOD_VERSION}


def _save_cache(res: MatchResult, a: LatentDirections, b: LatentDirections, cache_dir: Path) -> Path:
    npz, side = _cache_paths(cache_dir, a.content_hash, b.content_hash)
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **res.arrays())
    meta = {**_expected_settings(a, b), "a_name": a.name, "b_name": b.name,
            "npz_sha256": sha256_file(npz),
            "solver": {k: v for k, v in res.info.items() if isinstance(v, (str, int, float, list))}}
    write_json_atomic(side, meta)
    return npz


def _load_cache(npz: Path, side: Path, a: LatentDirections, b: LatentDirections) -> MatchResult:
    """Load a cached matching of a -> b; raise MatchCacheError when anything does not fit."""
    if not side.exists():
        raise MatchCacheError(f"{npz.name} has no JSON sidecar (interrupted write?)")
    try:
        meta = read_json(side)
    except ValueError as err:
        raise MatchCacheError(str(err)) from err
    for key, want in _expected_settings(a, b).items():
        if meta.get(key) != want:
            raise MatchCacheError(f"{side.name}: {key} is {meta.get(key)!r}, expected {want!r}")
    if sha256_file(npz) != meta.get("npz_sha256"):
        raise MatchCacheError(f"{npz.name}: SHA-256 differs from its sidecar (corrupt or replaced file)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrs = {k: np.array(z[k]) for k in MatchResult.ARRAYS}
    except Exception as err:  # noqa: BLE001 - any read failure means a bad cache
        raise MatchCacheError(f"{npz.name}: unreadable ({err})") from err
    n = a.n_latents
    for k, x in arrs.items():
        if x.shape != (n,):
            raise MatchCacheError(f"{npz.name}: {k} has shape {x.shape}, expected ({n},)")
    for k in ("dec_partner", "enc_partner"):
        if not np.array_equal(np.sort(arrs[k]), np.arange(n)):
            raise MatchCacheError(f"{npz.name}: {k} is not a permutation")
    res = MatchResult(a.name, b.name, a.content_hash, b.content_hash, **arrs,
                      info={**meta.get("solver", {}), "from_cache": str(npz)})
    _spot_check(res, a, b, npz.name)
    return res


def _spot_check(res: MatchResult, a: LatentDirections, b: LatentDirections, label: str,
                n_check: int = 32) -> None:
    """Recompute a few matched cosines from the weights: catches a cache whose content
    hash was right but whose numbers belong to other weights."""
    n = res.n_latents
    idx = np.unique(np.linspace(0, n - 1, min(n, n_check)).astype(np.int64))
    for part, partner, cos in (("decoder", res.dec_partner, res.dec_cos), ("encoder", res.enc_partner, res.enc_cos)):
        ua = unit_rows(getattr(a, part)[idx])
        ub = unit_rows(getattr(b, part)[partner[idx]])
        got = np.clip(np.einsum("ij,ij->i", ua.astype(np.float64), ub), -1, 1)
        if not np.allclose(got, cos[idx], atol=1e-4):
            raise MatchCacheError(f"{label}: cached {part} cosines do not match the SAE weights")


def match(
    a: LatentDirections,
    b: LatentDirections,
    cache: bool = True,
    method: str = "auto",
    cache_dir: Path | str | None = None,
    block_rows: int = 2048,
    device: str | None = None,
) -> MatchResult:
    """Match SAE `a` (base) to SAE `b`: decoder and encoder separately, each the bijection
    maximising the summed cosine, plus the max-cosine baseline both ways.

    `method`: "fast" (dense, certified), "scipy" (dense reference), "sparse" (certified, never holds
    the n x n matrix: `sparse_assignment`; its candidate blocks run on `device`, "auto" = a GPU where
    there is one), or "auto" (dense up to `DENSE_LIMIT_BYTES`, sparse above).

    With `cache=True` the result is read from / written to `cache_dir` (default
    `paths.MATCHINGS_DIR`); a cached b -> a matching is inverted. A corrupt or mismatching
    cache file triggers a warning and a recomputation, never a silently wrong answer.
    Peak memory (dense routes) is one float32 n x n cosine matrix plus the solver's sub-problem.
    """
    _validate_pair(a, b)
    if method not in ("auto", "fast", "scipy", "sparse"):
        raise ValueError(f"method must be 'auto', 'fast', 'scipy' or 'sparse', got {method!r}")
    cdir = Path(cache_dir) if cache_dir is not None else paths.MATCHINGS_DIR
    if cache:
        for x, y, flip in ((a, b, False), (b, a, True)):
            npz, side = _cache_paths(cdir, x.content_hash, y.content_hash)
            if npz.exists():
                try:
                    res = _load_cache(npz, side, x, y)
                except MatchCacheError as err:
                    warnings.warn(f"ignoring bad matching cache ({err}); recomputing", stacklevel=2)
                    continue
                res = res.inverse() if flip else res
                res.a_name, res.b_name = a.name, b.name
                return res
    res = _compute_match(a, b, method, block_rows, device)
    if cache:
        _save_cache(res, a, b, cdir)
    return res


DENSE_LIMIT_BYTES = 8 * 2**30
"""`method="auto"` switches to the sparse route above this size of one float32 n x n cosine matrix
(8 GiB: n > 46,340; at 2^17 the dense matrix would need 64 GiB)."""


def _compute_match(a: LatentDirections, b: LatentDirections, method: str, block_rows: int,
                   device: str | None = None) -> MatchResult:
    n = a.n_latents
    if method == "sparse" or (method == "auto" and 4 * n * n > DENSE_LIMIT_BYTES):
        return _compute_match_sparse(a, b, device)
    buf = np.empty((n, n), np.float32)
    out: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for part, tag in (("decoder", "dec"), ("encoder", "enc")):
        t0 = time.perf_counter()
        C = cosine_matrix(getattr(a, part), getattr(b, part), out=buf, block_rows=block_rows)
        t_cos = time.perf_counter() - t0
        r = solve_assignment_detailed(C, method=method, overwrite=True)
        if "row_max" not in r.info:  # scipy path: C is intact, take the maxima now
            st = top2(C)
            r.info.update(row_max=st["row_max"], row_arg=st["row_arg"], col_max=st["col_max"], col_arg=st["col_arg"])
        out[f"{tag}_partner"] = r.col_for_row
        out[f"{tag}_cos"] = r.values.astype(np.float32)
        out[f"{tag}_max_cos"] = r.info["row_max"].astype(np.float32)
        out[f"{tag}_max_partner"] = r.info["row_arg"].astype(np.int64)
        out[f"{tag}_max_cos_rev"] = r.info["col_max"].astype(np.float32)
        out[f"{tag}_max_partner_rev"] = r.info["col_arg"].astype(np.int64)
        info[f"{tag}_solver"] = r.info["method"]
        info[f"{tag}_t_cos"] = t_cos
        info[f"{tag}_t_solve"] = r.info.get("t_total", r.info.get("t_scipy", 0.0))
        info[f"{tag}_n_fixed"] = r.info.get("n_fixed", 0)
        info[f"{tag}_total"] = r.total
    del buf
    return MatchResult(a.name, b.name, a.content_hash, b.content_hash, info=info, **out)


def _compute_match_sparse(a: LatentDirections, b: LatentDirections, device: str | None) -> MatchResult:
    """Both matchings by the certified sparse route (`sparse_assignment.match_sparse`): no dense matrix."""
    from ..devices import resolve_device
    from .sparse_assignment import match_sparse

    dev = resolve_device(device or "auto")
    out: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for part, tag in (("decoder", "dec"), ("encoder", "enc")):
        r = match_sparse(getattr(a, part), getattr(b, part), device=dev)
        out[f"{tag}_partner"] = r.col_for_row
        out[f"{tag}_cos"] = r.values.astype(np.float32)
        out[f"{tag}_max_cos"] = r.row_max.astype(np.float32)
        out[f"{tag}_max_partner"] = r.row_arg.astype(np.int64)
        out[f"{tag}_max_cos_rev"] = r.col_max.astype(np.float32)
        out[f"{tag}_max_partner_rev"] = r.col_arg.astype(np.int64)
        info[f"{tag}_solver"] = "sparse"
        info[f"{tag}_t_solve"] = r.info["t_total"]
        info[f"{tag}_rounds"] = len(r.info["rounds"])
        info[f"{tag}_total"] = r.total
    return MatchResult(a.name, b.name, a.content_hash, b.content_hash, info=info, **out)


# --------------------------------------------------------------------------- shared latents
def shared_masks(result: "MatchResult | pd.DataFrame", threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
    """Boolean "shared" mask per base latent for every definition (SPEC section 2), strict `>`:

    - threshold: dec_cos > t and enc_cos > t, each at its own matched partner
    - agree:     the decoder and encoder matchings pick the same partner, both cosines > t
    - decoder:   dec_cos > t
    - maxcos:    row-max decoder cosine > t and row-max encoder cosine > t (no bijection)
    """
    if isinstance(result, pd.DataFrame):
        dp, dc = result["dec_partner"].to_numpy(), result["dec_cos"].to_numpy()
        ep, ec = result["enc_partner"].to_numpy(), result["enc_cos"].to_numpy()
        dm, em = result["dec_maxcos"].to_numpy(), result["enc_maxcos"].to_numpy()
    else:
        dp, dc, ep, ec = result.dec_partner, result.dec_cos, result.enc_partner, result.enc_cos
        dm, em = result.dec_max_cos, result.enc_max_cos
    # compare the exact float32 values against the threshold in float64 (no rounding of t)
    dc, ec, dm, em = (np.asarray(x, dtype=np.float64) for x in (dc, ec, dm, em))
    threshold = float(threshold)
    both = (dc > threshold) & (ec > threshold)
    return {"threshold": both, "agree": both & (dp == ep), "decoder": dc > threshold,
            "maxcos": (dm > threshold) & (em > threshold)}


def shared_fractions(result: "MatchResult | pd.DataFrame", threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Fraction of base latents shared under each definition of `shared_masks`."""
    return {k: float(v.mean()) if len(v) else float("nan") for k, v in shared_masks(result, threshold).items()}


def agreement_fraction(result: "MatchResult | pd.DataFrame") -> float:
    """Fraction of latents whose encoder and decoder matchings choose the same partner
    (no cosine threshold)."""
    if isinstance(result, pd.DataFrame):
        return float((result["dec_partner"].to_numpy() == result["enc_partner"].to_numpy()).mean())
    return float((result.dec_partner == result.enc_partner).mean())


def summary(result: MatchResult, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Scalar summary of one matching: mean matched / max cosines (Fig A3), the
    encoder/decoder agreement and the shared fraction per definition."""
    return {"a": result.a_name, "b": result.b_name, "n_latents": result.n_latents,
            "mean_dec_cos": float(result.dec_cos.mean()), "mean_enc_cos": float(result.enc_cos.mean()),
            "mean_dec_maxcos": float(result.dec_max_cos.mean()), "mean_enc_maxcos": float(result.enc_max_cos.mean()),
            "agreement": agreement_fraction(result), "threshold": threshold,
            **{f"shared_{k}": v for k, v in shared_fractions(result, threshold).items()}}


def comparison_frame(result: MatchResult, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """One row per base latent: partners, cosines, max-cosine baseline and shared flags."""
    masks = shared_masks(result, threshold)
    df = pd.DataFrame({
        "latent": np.arange(result.n_latents),
        "dec_partner": result.dec_partner, "dec_cos": result.dec_cos,
        "enc_partner": result.enc_partner, "enc_cos": result.enc_cos,
        "agree": result.dec_partner == result.enc_partner,
        "shared_threshold": masks["threshold"], "shared_agree": masks["agree"],
        "shared_decoder": masks["decoder"],
        "dec_maxcos": result.dec_max_cos, "enc_maxcos": result.enc_max_cos,
        "shared_maxcos": masks["maxcos"],
        "dec_maxcos_partner": result.dec_max_partner, "enc_maxcos_partner": result.enc_max_partner,
    })
    df.attrs.update(a=result.a_name, b=result.b_name, threshold=threshold)
    return df


def compare(a: "LatentDirections | MatchResult", b: LatentDirections | None = None,
            threshold: float = DEFAULT_THRESHOLD, **match_kwargs: Any) -> pd.DataFrame:
    """Match `a` to `b` (or take a ready MatchResult as `a`) and return `comparison_frame`."""
    if isinstance(a, MatchResult):
        if b is not None:
            raise TypeError("pass either a MatchResult or two LatentDirections")
        return comparison_frame(a, threshold)
    if b is None:
        raise TypeError("compare(a, b): b is missing")
    return comparison_frame(match(a, b, **match_kwargs), threshold)
