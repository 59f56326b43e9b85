"""Tests for replication.analysis.sparse_assignment: the certified matching without the dense matrix."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from replication.analysis import sparse_assignment as S
from replication.analysis.matching import DENSE_LIMIT_BYTES, match
from replication.sae.directions import LatentDirections


def pair(n: int, d: int, seed: int = 0, random_frac: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """B = a shuffled, noisy copy of A (cosines ~0.3-1), with a fraction of B's rows independent."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d))
    B = A[rng.permutation(n)] + rng.uniform(0.1, 3.0, (n, 1)) * rng.standard_normal((n, d))
    r = rng.random(n) < random_frac
    B[r] = rng.standard_normal((int(r.sum()), d))
    return A.astype(np.float32), B.astype(np.float32)


def exact_optimum(A: np.ndarray, B: np.ndarray) -> tuple[float, np.ndarray]:
    """Reference: scipy on the dense float64 cosine matrix."""
    C = S._unit64(A) @ S._unit64(B).T
    _, col = linear_sum_assignment(C, maximize=True)
    return float(C[np.arange(len(col)), col].sum()), col


@pytest.mark.parametrize("n,d,m,seed", [(300, 16, 4, 0), (500, 32, 8, 1), (400, 8, 2, 2), (257, 64, 16, 3)])
def test_equals_dense_float64_optimum(n, d, m, seed):
    A, B = pair(n, d, seed)
    r = S.match_sparse(A, B, m=m)
    total, col = exact_optimum(A, B)
    assert r.total == pytest.approx(total, abs=1e-9)
    np.testing.assert_array_equal(r.col_for_row, col)           # unique optimum on continuous data
    assert sorted(r.col_for_row.tolist()) == list(range(n))
    C = S._unit64(A) @ S._unit64(B).T
    np.testing.assert_allclose(r.values, C[np.arange(n), r.col_for_row], atol=1e-12)
    np.testing.assert_allclose(r.row_max, C.max(1), atol=1e-5)
    np.testing.assert_array_equal(r.row_arg, C.argmax(1))
    np.testing.assert_allclose(r.col_max, C.max(0), atol=1e-5)
    np.testing.assert_array_equal(r.col_arg, C.argmax(0))
    assert "float64 duals" in r.info["certificate"]


def test_certificate_can_fail_and_then_widens():
    """With one candidate per row, the first sparse optimum is not the dense one: the certificate must
    reject it (entries added), and the widened problem must reach the true optimum. With a single round
    allowed, the same input must raise instead of returning an uncertified answer."""
    A, B = pair(400, 8, seed=5, random_frac=0.6)
    r = S.match_sparse(A, B, m=1)
    assert r.info["rounds"][0]["entries_added"] > 0
    assert len(r.info["rounds"]) > 1
    assert r.total == pytest.approx(exact_optimum(A, B)[0], abs=1e-9)
    with pytest.raises(RuntimeError, match="no optimality certificate"):
        S.match_sparse(A, B, m=1, max_rounds=1)


def test_candidate_only_solution_is_suboptimal_without_certification():
    """Calibration of the check itself: on this input the optimum restricted to the first candidates (row
    top-1, column top-1, diagonal) is strictly worse than the dense optimum, so accepting round 1 without
    the certificate would be wrong; match_sparse must not return it."""
    A, B = pair(400, 8, seed=5, random_frac=0.6)
    n = len(A)
    A64, B64 = S._unit64(A), S._unit64(B)
    C = A64 @ B64.T
    rows = np.r_[np.arange(n), C.argmax(0), np.arange(n)]
    cols = np.r_[C.argmax(1), np.arange(n), np.arange(n)]
    key = np.unique(rows * n + cols)
    rows, cols = key // n, key % n
    restricted = S._solve_sparse(n, rows, cols, 2.0 - C[rows, cols])
    best = exact_optimum(A, B)[0]
    assert C[np.arange(n), restricted].sum() < best - 1e-6
    assert S.match_sparse(A, B, m=1).total == pytest.approx(best, abs=1e-9)


def test_bound_on_left_out_entries_is_an_upper_bound():
    rng = np.random.default_rng(0)
    t_row, t_col, v = rng.random(50), rng.random(40), rng.standard_normal(40)
    brute = np.array([np.max(np.minimum(t, t_col) + v) for t in t_row])
    np.testing.assert_allclose(S._max_left_out(t_row, t_col, v), brute)


def test_rounding_bound_covers_float32_matmul():
    A, B = pair(200, 768, 0)
    A64, B64 = S._unit64(A), S._unit64(B)
    err = np.abs(A64.astype(np.float32) @ B64.astype(np.float32).T - A64 @ B64.T).max()
    assert err < S.rounding_bound(768)


def test_bad_input_errors():
    A, B = pair(20, 4)
    with pytest.raises(ValueError, match="same shape"):
        S.match_sparse(A, B[:10])
    bad = A.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.match_sparse(bad, B)
    with pytest.raises(ValueError, match="m .* must be >= 1"):
        S.match_sparse(A, B, m=0)


def test_match_routes_sparse_and_auto_threshold(monkeypatch):
    A, B = pair(120, 16, 1)
    a = LatentDirections(A, A, name="a")
    b = LatentDirections(B, B, name="b")
    dense = match(a, b, cache=False, method="fast")
    sparse = match(a, b, cache=False, method="sparse")
    np.testing.assert_array_equal(dense.dec_partner, sparse.dec_partner)
    np.testing.assert_array_equal(dense.enc_partner, sparse.enc_partner)
    np.testing.assert_array_equal(dense.dec_max_partner, sparse.dec_max_partner)
    np.testing.assert_array_equal(dense.dec_max_partner_rev, sparse.dec_max_partner_rev)
    np.testing.assert_allclose(dense.dec_cos, sparse.dec_cos, atol=1e-5)
    assert sparse.info["dec_solver"] == "sparse" and dense.info["dec_solver"] != "sparse"
    monkeypatch.setattr("replication.analysis.matching.DENSE_LIMIT_BYTES", 4 * 100 * 100)
    assert match(a, b, cache=False, method="auto").info["dec_solver"] == "sparse"
    assert DENSE_LIMIT_BYTES >= 4 * 32768 ** 2          # every size up to 2^15 stays on the dense route
    with pytest.raises(ValueError, match="method must be"):
        match(a, b, cache=False, method="hungarian")
