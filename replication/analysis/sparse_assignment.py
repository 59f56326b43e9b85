"""Exact cosine matching that never holds the dense n x n matrix (Figure 4 at 2^17 latents).

At n = 2^17 a dense float32 cosine matrix needs 64 GiB. This route keeps only candidates and proves
that the assignment it finds is optimal for the full matrix:

1. *Candidates, in blocks.* Row blocks of ``unit(A) @ unit(B).T`` are computed in float32 (on the
   given torch device, a GPU where there is one); each row keeps its top-``m`` columns, each column its
   top-``m`` rows (a running merge over the blocks), plus the pairs (i, i) so that a perfect matching
   always exists among the candidates. For every row, ``t_i`` (its m-th largest float32 cosine) bounds
   every left-out entry of that row. Row and column maxima (the max-cosine baseline) come for free.
2. *Exact values.* Candidate cosines are recomputed in float64 from float64 unit rows.
3. *Sparse solve.* ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp) finds the
   optimal assignment on the candidate graph, for costs ``2 - cos`` (> 0, as it requires).
4. *Duals.* Given that optimal assignment M, feasible float64 duals (u, v) with ``c_ij - u_i - v_j >= 0``
   on every candidate and ``= 0`` on M are shortest-path distances over the columns (arcs
   ``M(i) -> j`` of weight ``c_ij - c_iM(i)``; no negative cycle because M is optimal), found by a
   vectorised Bellman-Ford.
5. *Certificate for the left-out entries.* A left-out entry has float64 cosine at most
   ``t_i + E``, where E bounds the float32 matmul's rounding error for unit vectors (``(d + 2) 2^-24``,
   doubled). A row is certified when ``2 - t_i - E - u_i - max(v) >= 0``. Rows that fail this bound
   are checked entry by entry (their full row recomputed in float32, violators recomputed in
   float64); violating entries become candidates and the solve is repeated. When every row is
   certified, (u, v) is feasible for the whole matrix and complementary on M: M is optimal for the
   float64 cosines, the same certificate the dense route gives.

Generic like `assignment`: it knows about row vectors and cosines, not about SAEs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_SHIFT = 2.0          # cost = _SHIFT - cos > 0 (LAPJVsp needs non-zero weights)
_DUAL_TOL = 1e-12     # float64 slack of the dual feasibility checks
_SCREEN_TOL = 1e-5    # float32 screen of the full-row checks: keeps every entry whose float64 value could violate


@dataclass
class SparseAssignment:
    """An optimal bijection of A's rows to B's rows by cosine, found without the dense matrix.

    `col_for_row[i]` is row i's partner, `values[i]` their float64 cosine, `total` the exactly rounded
    sum; `row_max`/`row_arg` and `col_max`/`col_arg` are the float32 row and column maxima of the full
    cosine matrix (the max-cosine baseline). `info` holds m, rounds, timings and the certificate."""

    col_for_row: np.ndarray
    values: np.ndarray
    total: float
    row_max: np.ndarray
    row_arg: np.ndarray
    col_max: np.ndarray
    col_arg: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _unit64(W: np.ndarray) -> np.ndarray:
    W64 = np.asarray(W, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", W64, W64))
    scale = np.zeros_like(norms)
    np.divide(1.0, norms, out=scale, where=norms > 0)
    return W64 * scale[:, None]


def rounding_bound(d: int) -> float:
    """Bound on |float32 cosine - exact cosine| for unit vectors of dimension d: the inputs' rounding
    (2 u) plus any order of float32 summation (d u / (1 - d u)), u = 2^-24; doubled for safety."""
    u = 2.0 ** -24
    return 2.0 * ((d + 2) * u / (1 - (d + 2) * u))


def _candidates(A32: torch.Tensor, B32: torch.Tensor, m: int, block_rows: int,
                progress: bool) -> dict[str, np.ndarray]:
    """Row top-m, column top-m (merged over row blocks) and row/column maxima of A32 @ B32.T."""
    n = A32.shape[0]
    mc = min(m, n)
    row_idx = np.empty((n, mc), np.int64)
    row_val = np.empty((n, mc), np.float32)
    col_val = torch.full((mc, B32.shape[0]), -math.inf, device=A32.device)
    col_idx = torch.zeros((mc, B32.shape[0]), dtype=torch.int64, device=A32.device)
    BT = B32.T.contiguous()
    starts = range(0, n, block_rows)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"candidates (top-{mc})", unit="block")
    for s in starts:
        S = A32[s:s + block_rows] @ BT
        v, j = torch.topk(S, mc, dim=1)
        row_idx[s:s + len(S)] = j.cpu().numpy()
        row_val[s:s + len(S)] = v.cpu().numpy()
        kb = min(mc, S.shape[0])
        cv, ci = torch.topk(S, kb, dim=0)
        merged_v = torch.cat([col_val, cv], 0)
        merged_i = torch.cat([col_idx, ci + s], 0)
        keep_v, keep = torch.topk(merged_v, mc, dim=0)
        col_val, col_idx = keep_v, torch.gather(merged_i, 0, keep)
    return {"row_idx": row_idx, "row_val": row_val, "col_idx": col_idx.cpu().numpy(),
            "col_val": col_val.cpu().numpy()}


def _exact_cos(A64: np.ndarray, B64: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               chunk: int = 1 << 18) -> np.ndarray:
    """float64 cosines of the pairs (rows[k], cols[k])."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        out[s:s + chunk] = np.einsum("ij,ij->i", A64[r], B64[c])
    return out


def _solve_sparse(n: int, rows: np.ndarray, cols: np.ndarray, cost: np.ndarray) -> np.ndarray:
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    G = csr_array((cost, (rows, cols)), shape=(n, n))
    r, c = min_weight_full_bipartite_matching(G)
    col_for_row = np.empty(n, np.int64)
    col_for_row[r] = c
    return col_for_row


def _duals(n: int, rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, col_for_row: np.ndarray,
           max_iter: int = 100_000) -> tuple[np.ndarray, np.ndarray, int]:
    """Feasible duals (u, v) for the candidate graph, tight on the assignment (vectorised Bellman-Ford
    over the columns from a virtual source joined to every column by a 0 arc)."""
    own = np.empty(n)
    on_m = col_for_row[rows] == cols
    own[rows[on_m]] = cost[on_m]
    off = ~on_m
    src = col_for_row[rows[off]]
    dst = cols[off]
    w = cost[off] - own[rows[off]]
    order = np.argsort(dst, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]]) if len(dst) else np.empty(0, np.int64)
    targets = dst[starts]
    v = np.zeros(n)
    it = 0
    for it in range(1, max_iter + 1):
        if not len(dst):
            break
        best = np.minimum.reduceat(v[src] + w, starts)
        better = best < v[targets] - _DUAL_TOL
        if not better.any():
            break
        v[targets[better]] = best[better]
    else:
        raise RuntimeError("dual potentials did not converge (a negative cycle: the assignment is not optimal)")
    u = own - v[col_for_row]
    return u, v, it


def match_sparse(A: np.ndarray, B: np.ndarray, m: int = 16, device: str | torch.device = "auto",
                 block_rows: int = 1024, max_rounds: int = 8, check_block_rows: int = 512,
                 progress: bool = False) -> SparseAssignment:
    """Maximum-cosine bijection of A's rows to B's rows, exact and certified, without the dense matrix.

    `device`: where the float32 candidate blocks run ("auto": a GPU where there is one). `m` candidates
    per row and per column to start with; rows whose left-out entries cannot be bounded
    by the duals are checked in full and their violating entries added (see the module docstring).
    Peak memory ~ two float64 copies of A and B plus a `block_rows` x n float32 block."""
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape != B.shape:
        raise ValueError(f"match_sparse needs two [n, d] arrays of the same shape, got {A.shape} and {B.shape}")
    if A.shape[0] < 1:
        raise ValueError("match_sparse needs at least one row")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise ValueError("directions contain NaN or infinite entries")
    if m < 1:
        raise ValueError(f"m (candidates per row) must be >= 1, got {m}")
    n, d = A.shape
    from ..devices import resolve_device

    dev = torch.device(resolve_device(device))
    info: dict[str, Any] = {"m": int(min(m, n)), "device": str(dev), "n": n}
    t0 = time.perf_counter()
    A64, B64 = _unit64(A), _unit64(B)
    with torch.no_grad():
        prec = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")     # no TF32 / bf16 inside the float32 matmuls
        try:
            A32 = torch.from_numpy(A64.astype(np.float32)).to(dev)
            B32 = torch.from_numpy(B64.astype(np.float32)).to(dev)
            cand = _candidates(A32, B32, m, block_rows, progress)
        finally:
            torch.set_float32_matmul_precision(prec)
    info["t_candidates"] = time.perf_counter() - t0
    E = rounding_bound(d)
    t_row = cand["row_val"][:, -1].astype(np.float64)      # a left-out entry (i, j) is <= t_row[i] and <= t_col[j]
    t_col = cand["col_val"][-1].astype(np.float64)          # (float32): it is in neither top-m
    mc = cand["row_idx"].shape[1]
    rows = np.concatenate([np.repeat(np.arange(n), mc), cand["col_idx"].reshape(-1), np.arange(n)])
    cols = np.concatenate([cand["row_idx"].reshape(-1), np.tile(np.arange(n), mc), np.arange(n)])
    key = np.unique(rows * n + cols)
    rows, cols = key // n, key % n
    cost = _SHIFT - _exact_cos(A64, B64, rows, cols)
    info["rounds"] = []
    certified = False
    for rnd in range(max_rounds):
        t1 = time.perf_counter()
        col_for_row = _solve_sparse(n, rows, cols, cost)
        t_solve = time.perf_counter() - t1
        u, v, n_iter = _duals(n, rows, cols, cost, col_for_row)
        slack = (_SHIFT - E) - u - _max_left_out(t_row, t_col, v)
        suspect = np.flatnonzero(slack < -_DUAL_TOL)
        t2 = time.perf_counter()
        new_r, new_c, new_cos = _check_rows(A32, B32, A64, B64, suspect, u, v, E, check_block_rows, rows, cols, n)
        rnd_info = {"n_candidates": int(len(rows)), "t_solve": t_solve, "dual_iterations": n_iter,
                    "rows_checked_in_full": int(len(suspect)), "entries_added": int(len(new_r)),
                    "t_check": time.perf_counter() - t2}
        info["rounds"].append(rnd_info)
        if not len(new_r):
            certified = True
            break
        key = np.concatenate([rows * n + cols, new_r * n + new_c])   # new entries are never candidates yet
        cost = np.concatenate([cost, _SHIFT - new_cos])
        order = np.argsort(key, kind="stable")
        key, cost = key[order], cost[order]
        rows, cols = key // n, key % n
    if not certified:
        raise RuntimeError(f"no optimality certificate after {max_rounds} rounds; rerun with a larger m (was {m})")
    values = _exact_cos(A64, B64, np.arange(n), col_for_row)
    info["certificate"] = ("float64 duals feasible on every candidate, tight on the assignment; left-out entries "
                           f"bounded by the float32 top-{mc} threshold + {E:.2e} or checked in full")
    info["t_total"] = time.perf_counter() - t0
    return SparseAssignment(col_for_row=col_for_row, values=values, total=math.fsum(values.tolist()),
                            row_max=cand["row_val"][:, 0].copy(), row_arg=cand["row_idx"][:, 0].copy(),
                            col_max=cand["col_val"][0].copy(), col_arg=cand["col_idx"][0].copy(), info=info)


def _max_left_out(t_row: np.ndarray, t_col: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row i, an upper bound on ``cos_ij + v_j`` over its left-out entries: ``max_j min(t_row[i], t_col[j]) + v_j``,
    from a sort of the columns by t_col (suffix maxima of v, prefix maxima of t_col + v)."""
    order = np.argsort(t_col)
    tc, vv = t_col[order], v[order]
    prefix = np.maximum.accumulate(tc + vv)                         # columns with t_col <= t_row: t_col + v
    suffix = np.maximum.accumulate(vv[::-1])[::-1]                  # columns with t_col > t_row: t_row + v
    k = np.searchsorted(tc, t_row, side="right")                     # tc[:k] <= t_row
    low = np.where(k > 0, prefix[np.maximum(k - 1, 0)], -np.inf)
    high = np.where(k < len(tc), t_row + suffix[np.minimum(k, len(tc) - 1)], -np.inf)
    return np.maximum(low, high)


def _check_rows(A32: torch.Tensor, B32: torch.Tensor, A64: np.ndarray, B64: np.ndarray, suspect: np.ndarray,
                u: np.ndarray, v: np.ndarray, E: float, block_rows: int, rows: np.ndarray, cols: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of the `suspect` rows whose reduced cost may be negative, and is not yet a candidate.

    The full rows are recomputed in float32; entries whose float32 bound allows a violation are
    recomputed in float64 and kept only if they do violate."""
    if not len(suspect):
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    existing = rows * n + cols                  # sorted (the candidates are kept in key order)
    BT = B32.T.contiguous()
    v_t32 = torch.from_numpy(v).float().to(B32.device)
    out_r, out_c, out_v = [], [], []
    with torch.no_grad():
        for s in range(0, len(suspect), block_rows):
            r = suspect[s:s + block_rows]
            S = A32[torch.from_numpy(r).to(A32.device)] @ BT
            # reduced cost lower bound 2 - (cos32 + E) - u_i - v_j, screened in float32 with a margin for its own
            # rounding (|terms| < 4: float32 error < 4 ulp(4) ~ 2e-6); flagged entries are then decided in float64
            S.neg_().add_(v_t32[None, :], alpha=-1).add_(torch.from_numpy((_SHIFT - E) - u[r]).float().to(S.device)[:, None])
            ii, jj = torch.nonzero(S < _SCREEN_TOL, as_tuple=True)
            ri, cj = r[ii.cpu().numpy()], jj.cpu().numpy()
            k = ri * n + cj
            pos = np.minimum(np.searchsorted(existing, k), len(existing) - 1)
            fresh = existing[pos] != k
            ri, cj = ri[fresh], cj[fresh]
            cos = _exact_cos(A64, B64, ri, cj)
            bad = (_SHIFT - cos) - u[ri] - v[cj] < -_DUAL_TOL
            out_r.append(ri[bad])
            out_c.append(cj[bad])
            out_v.append(cos[bad])
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)
