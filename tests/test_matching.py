"""Tests for replication.analysis.matching: exact assignment, SAE matching, shared definitions, cache."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment

from replication import assignment as A
from replication import matching as M
from replication.sae.directions import LatentDirections

lapjv = pytest.importorskip("lapjv")


def scipy_total(C: np.ndarray) -> tuple[float, np.ndarray]:
    _, col = linear_sum_assignment(C, maximize=True)
    return A.assignment_total(C, col), col


def sae(n: int, d: int, seed: int, name: str = "") -> LatentDirections:
    rng = np.random.default_rng(seed)
    dec = rng.standard_normal((n, d)).astype(np.float32)
    enc = dec + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return LatentDirections(enc, dec, name=name or f"sae{seed}")


def related_pair(n: int, d: int, seed: int, frac: float = 0.5, noise: float = 0.3):
    """Two SAEs sharing `frac` of their latents (plus noise), in shuffled order."""
    a = sae(n, d, seed, "a")
    rng = np.random.default_rng(seed + 1000)
    k = int(frac * n)
    dec = rng.standard_normal((n, d)).astype(np.float32)
    enc = dec + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    dec[:k] = a.decoder[:k] / np.linalg.norm(a.decoder[:k], axis=1, keepdims=True) + noise / np.sqrt(d) * \
        rng.standard_normal((k, d))
    enc[:k] = a.encoder[:k] / np.linalg.norm(a.encoder[:k], axis=1, keepdims=True) + noise / np.sqrt(d) * \
        rng.standard_normal((k, d))
    perm = rng.permutation(n)
    return a, LatentDirections(enc[perm], dec[perm], name="b")


# --------------------------------------------------------------------------- cosines
def test_unit_rows_zero_rows_give_zero_not_nan():
    W = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float32)
    U = M.unit_rows(W)
    assert U.dtype == np.float32
    assert np.isfinite(U).all()
    np.testing.assert_allclose(U[0], [0.6, 0.8], rtol=1e-6)
    assert (U[1] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(U[2]), 1.0, rtol=1e-6)
    C = M.cosine_matrix(W, W)
    assert np.isfinite(C).all() and C[1].max() == 0 and C[:, 1].max() == 0


def test_cosine_matrix_blockwise_and_out_buffer():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((37, 9)), rng.standard_normal((37, 9))
    ref = (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T
    out = np.full((37, 37), 7.0, np.float32)
    C = M.cosine_matrix(A, B, out=out, block_rows=5)
    assert C is out
    np.testing.assert_allclose(C, ref, atol=2e-6)
    assert C.max() <= 1.0 and C.min() >= -1.0
    with pytest.raises(ValueError):
        M.cosine_matrix(A, B, out=np.empty((36, 37), np.float32))


# --------------------------------------------------------------------------- exact assignment
@pytest.mark.parametrize("seed", range(4))
def test_fast_equals_scipy_random_unique(seed):
    rng = np.random.default_rng(seed)
    for n in (2, 3, 7, 31, 120, 400):
        C = rng.standard_normal((n, n)).astype(np.float32)
        ref, col = scipy_total(C)
        r = A.solve_assignment_detailed(C, method="fast")
        assert r.total == ref
        np.testing.assert_array_equal(r.col_for_row, col)  # continuous: unique optimum
        np.testing.assert_array_equal(r.values, C[np.arange(n), col])


def _adversarial(rng, kind, n):
    if kind == "int_ties":
        return rng.integers(-2, 3, (n, n)).astype(np.float32)
    if kind == "coarse_ties":
        return (np.round(rng.random((n, n)) * 4) / 4).astype(np.float32)
    if kind == "zeros":
        return np.zeros((n, n), np.float32)
    if kind == "constant":
        return np.full((n, n), 0.25, np.float32)
    if kind == "duplicate_rows":
        base = rng.standard_normal((max(1, n // 3), 6))
        A = base[rng.integers(0, len(base), n)]
        B = np.concatenate([A[: n // 2], rng.standard_normal((n - n // 2, 6))])
        return M.cosine_matrix(A, B)
    if kind == "planted_perm":
        C = 0.1 * rng.random((n, n)).astype(np.float32)
        C[np.arange(n), rng.permutation(n)] += 0.8
        return C
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["int_ties", "coarse_ties", "zeros", "constant", "duplicate_rows", "planted_perm"])
def test_fast_equals_scipy_adversarial(kind):
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 5, 17, 64, 150):
        for _ in range(3):
            C = _adversarial(rng, kind, n)
            C0 = C.copy()
            ref, _ = scipy_total(C)
            col = A.solve_assignment(C, method="fast")
            assert np.array_equal(C, C0), "overwrite=False must leave C unchanged"
            assert sorted(col.tolist()) == list(range(n))
            assert A.assignment_total(C, col) == ref


def test_overwrite_true_gives_same_answer():
    rng = np.random.default_rng(5)
    C = _adversarial(rng, "planted_perm", 300)
    ref, col = scipy_total(C)
    r = A.solve_assignment_detailed(C.copy(), method="fast", overwrite=True)
    assert r.info["n_fixed"] > 0
    assert r.total == ref
    np.testing.assert_array_equal(r.col_for_row, col)


@pytest.mark.parametrize("kind", ["random", "int_ties"])
def test_top2_stats_blockwise_match_reference(kind):
    rng = np.random.default_rng(4)
    C = rng.standard_normal((23, 23)).astype(np.float32) if kind == "random" else \
        rng.integers(0, 3, (23, 23)).astype(np.float32)
    C0 = C.copy()
    st = A.top2(C, block_rows=4)
    assert np.array_equal(C, C0)
    srt_r, srt_c = np.sort(C, axis=1), np.sort(C, axis=0)
    np.testing.assert_array_equal(st["row_max"], srt_r[:, -1])
    np.testing.assert_array_equal(st["row_max2"], srt_r[:, -2])
    np.testing.assert_array_equal(st["col_max"], srt_c[-1])
    np.testing.assert_array_equal(st["col_max2"], srt_c[-2])
    np.testing.assert_array_equal(st["row_arg"], C.argmax(axis=1))
    np.testing.assert_array_equal(st["col_arg"], C.argmax(axis=0))
    assert st["min"] == C.min() and st["max"] == C.max()


def test_small_blocks_and_rounds_still_optimal():
    rng = np.random.default_rng(9)
    for _ in range(5):
        C = _adversarial(rng, "planted_perm", 90)
        C[:, :30] = (np.round(C[:, :30] * 8) / 8).astype(np.float32)  # add ties
        ref, _ = scipy_total(C)
        r = A.solve_assignment_detailed(C, method="fast", block_rows=7)
        assert r.total == ref


def test_reduction_rejects_mutual_best_pair_that_is_not_optimal():
    # (0, 0) are mutual nearest neighbours, yet the optimum pairs 0-1 and 1-0 (1.8 > 1.0)
    C = np.array([[1.0, 0.9], [0.9, 0.0]], np.float32)
    i, j = A._provable_pairs(A.top2(C.copy()))
    assert len(i) == 0
    np.testing.assert_array_equal(A.solve_assignment(C, method="fast"), [1, 0])


def test_provable_pairs_are_in_the_optimum():
    rng = np.random.default_rng(3)
    C = _adversarial(rng, "planted_perm", 200)
    i, j = A._provable_pairs(A.top2(C.copy()))
    _, col = scipy_total(C)
    assert len(i) > 100
    np.testing.assert_array_equal(col[i], j)


def test_repair_path_fixes_a_wrong_lapjv_answer(monkeypatch):
    """If lapjv returned a poor assignment with useless duals, the float64 certificate must
    notice and the exact repair must reach the optimum."""
    def fake_lapjv(c, *args, **kwargs):
        m = c.shape[0]
        ident = np.arange(m, dtype=np.int32)
        return ident, ident, (0.0, np.zeros(m, np.float32), np.zeros(m, np.float32))

    monkeypatch.setattr(lapjv, "lapjv", fake_lapjv)
    rng = np.random.default_rng(11)
    for n in (4, 40, 200):
        C = rng.standard_normal((n, n)).astype(np.float32)
        ref, col = scipy_total(C)
        r = A.solve_assignment_detailed(C, method="fast")
        assert r.info["n_repaired"] > 0
        assert r.total == ref
        np.testing.assert_array_equal(r.col_for_row, col)


def test_invalid_lapjv_output_falls_back_to_scipy(monkeypatch):
    monkeypatch.setattr(lapjv, "lapjv", lambda c, *a, **k: (np.zeros(c.shape[0], np.int32),) * 2 + ((0.0, None, None),))
    C = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    with pytest.warns(UserWarning, match="invalid assignment"):
        col = A.solve_assignment(C, method="fast")
    assert A.assignment_total(C, col) == scipy_total(C)[0]


def test_solver_input_errors():
    with pytest.raises(ValueError, match="square"):
        A.solve_assignment(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        A.solve_assignment(np.zeros(3, np.float32))
    bad = np.zeros((3, 3), np.float32)
    bad[1, 2] = np.nan
    for method in ("fast", "scipy"):
        with pytest.raises(ValueError):
            A.solve_assignment(bad, method=method)
    with pytest.raises(ValueError, match="method"):
        A.solve_assignment(np.zeros((2, 2), np.float32), method="greedy")
    # float64 costs that float32 cannot hold exactly: 'fast' refuses, 'auto' uses scipy
    C64 = np.random.default_rng(0).standard_normal((5, 5))
    with pytest.raises(ValueError, match="float32"):
        A.solve_assignment(C64, method="fast")
    assert A.solve_assignment_detailed(C64).info["method"] == "scipy"
    assert len(A.solve_assignment(np.zeros((0, 0), np.float32))) == 0


def test_scipy_method_matches_fast():
    rng = np.random.default_rng(2)
    C = rng.standard_normal((50, 50)).astype(np.float32)
    np.testing.assert_array_equal(A.solve_assignment(C, method="scipy"), A.solve_assignment(C, method="fast"))


# --------------------------------------------------------------------------- SAE matching
@pytest.mark.parametrize("method", ["fast", "scipy", "sparse"])
def test_shuffled_sae_is_fully_shared_and_permutation_recovered(method):
    a = sae(96, 16, 0)
    perm = np.random.default_rng(1).permutation(96)
    b = LatentDirections(a.encoder[perm] * 3.0, a.decoder[perm] * 0.5, name="shuffled")
    res = M.match(a, b, cache=False, method=method)
    inv = np.argsort(perm)  # a's latent i sits at row inv[i] of b
    np.testing.assert_array_equal(res.dec_partner, inv)
    np.testing.assert_array_equal(res.enc_partner, inv)
    np.testing.assert_array_equal(res.dec_max_partner, inv)
    np.testing.assert_allclose(res.dec_cos, 1.0, atol=1e-5)
    fr = M.shared_fractions(res, 0.7)
    assert set(fr) == set(M.DEFINITIONS)
    assert all(v == 1.0 for v in fr.values()), fr
    assert M.agreement_fraction(res) == 1.0


def test_related_pair_definitions_ordering_and_frame():
    a, b = related_pair(200, 32, 4)
    res = M.match(a, b, cache=False)
    df = M.compare(res, threshold=0.7)
    expected = ["latent", "dec_partner", "dec_cos", "enc_partner", "enc_cos", "agree", "shared_threshold",
                "shared_agree", "shared_decoder", "dec_maxcos", "enc_maxcos", "shared_maxcos"]
    assert all(c in df.columns for c in expected)
    assert len(df) == 200 and df["agree"].dtype == bool
    fr = M.shared_fractions(df, 0.7)
    assert fr == M.shared_fractions(res, 0.7)
    assert 0.3 < fr["threshold"] <= 0.6  # about half the latents were planted as shared
    assert fr["agree"] <= fr["threshold"] <= fr["decoder"]
    # matched cosine never exceeds the row maximum (same float32 matrix)
    assert (res.dec_cos <= res.dec_max_cos).all() and (res.enc_cos <= res.enc_max_cos).all()
    # compare(a, b) gives the same frame
    pd.testing.assert_frame_equal(M.compare(a, b, cache=False), df)


def test_match_agrees_with_scipy_on_sae_pair_and_inverse():
    a, b = related_pair(150, 24, 7)
    fast = M.match(a, b, cache=False, method="fast")
    ref = M.match(a, b, cache=False, method="scipy")
    for k in M.MatchResult.ARRAYS:
        np.testing.assert_array_equal(getattr(fast, k), getattr(ref, k), err_msg=k)
    inv = fast.inverse()
    direct = M.match(b, a, cache=False, method="scipy")
    for k in M.MatchResult.ARRAYS:
        # B @ A.T equals (A @ B.T).T only up to float32 rounding of the products
        if "cos" in k:
            np.testing.assert_allclose(getattr(inv, k), getattr(direct, k), atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(getattr(inv, k), getattr(direct, k), err_msg=k)
    # max-cosine is not symmetric: the reverse baseline is the column maximum
    C = M.cosine_matrix(a.decoder, b.decoder)
    np.testing.assert_array_equal(fast.dec_max_cos_rev, C.max(axis=0))
    np.testing.assert_array_equal(fast.dec_max_partner_rev, C.argmax(axis=0))


def test_dead_sae_matches_with_zero_cosine():
    live = sae(40, 8, 0)
    dead = LatentDirections(np.zeros((40, 8), np.float32), np.zeros((40, 8), np.float32), name="dead")
    for x, y in ((live, dead), (dead, dead)):
        res = M.match(x, y, cache=False)
        assert sorted(res.dec_partner.tolist()) == list(range(40))
        assert np.isfinite(res.dec_cos).all() and (res.dec_cos == 0).all() and (res.enc_max_cos == 0).all()
        assert all(v == 0.0 for v in M.shared_fractions(res).values())


def test_strict_threshold():
    n = 3
    cos = np.array([0.75, np.nextafter(np.float32(0.75), np.float32(1)), 0.9], np.float32)
    ident = np.arange(n)
    res = M.MatchResult("a", "b", "h1", "h2", ident, cos, ident, cos, cos, ident, cos, ident,
                        cos, ident, cos, ident)
    masks = M.shared_masks(res, 0.75)
    np.testing.assert_array_equal(masks["threshold"], [False, True, True])
    np.testing.assert_array_equal(masks["maxcos"], [False, True, True])


def test_clear_errors_for_mismatched_saes():
    a = sae(10, 8, 0)
    with pytest.raises(ValueError, match="different input widths"):
        M.match(a, sae(10, 9, 1), cache=False)
    with pytest.raises(ValueError, match="bijection.*same"):
        M.match(a, sae(12, 8, 1), cache=False)
    bad = sae(10, 8, 2)
    bad.decoder[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.match(a, bad, cache=False)


# --------------------------------------------------------------------------- cache
def test_cache_round_trip_and_reverse(tmp_path):
    a, b = related_pair(64, 16, 3)
    r1 = M.match(a, b, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    side = json.loads((tmp_path / files[0]).read_text())
    assert side["a_hash"] == a.content_hash and side["method_version"] == M.METHOD_VERSION
    r2 = M.match(a, b, cache_dir=tmp_path)
    assert "from_cache" in r2.info
    for k in M.MatchResult.ARRAYS:
        np.testing.assert_array_equal(getattr(r1, k), getattr(r2, k))
    r3 = M.match(b, a, cache_dir=tmp_path)  # served by inverting the a -> b file
    assert "from_cache" in r3.info and len(list(tmp_path.iterdir())) == 2
    for k in M.MatchResult.ARRAYS:
        np.testing.assert_array_equal(getattr(r3, k), getattr(r1.inverse(), k))


def test_corrupt_cache_is_detected_and_recomputed(tmp_path):
    a, b = related_pair(48, 12, 5)
    ref = M.match(a, b, cache_dir=tmp_path)
    npz = next(tmp_path.glob("*.npz"))
    side = next(tmp_path.glob("*.json"))
    # 1. flipped bytes
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="SHA-256"):
        r = M.match(a, b, cache_dir=tmp_path)
    np.testing.assert_array_equal(r.dec_partner, ref.dec_partner)
    assert "from_cache" not in r.info
    # 2. the recomputation rewrote a valid cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "from_cache" in M.match(a, b, cache_dir=tmp_path).info
    # 3. missing sidecar
    side.unlink()
    with pytest.warns(UserWarning, match="sidecar"):
        M.match(a, b, cache_dir=tmp_path)
    # 4. numbers that belong to other weights under the right hashes (self-consistent file)
    wrong = M.match(a, b, cache=False)
    wrong.dec_partner = np.roll(wrong.dec_partner, 1)
    wrong.dec_cos = np.roll(wrong.dec_cos, 1)
    M._save_cache(wrong, a, b, tmp_path)
    with pytest.warns(UserWarning, match="do not match"):
        r = M.match(a, b, cache_dir=tmp_path)
    np.testing.assert_array_equal(r.dec_partner, ref.dec_partner)


def test_default_cache_dir_is_matchings_dir(tmp_path, monkeypatch):
    from replication import paths

    monkeypatch.setattr(paths, "MATCHINGS_DIR", tmp_path / "matchings")
    a, b = related_pair(16, 8, 1)
    M.match(a, b)
    assert len(list((tmp_path / "matchings").glob("*.npz"))) == 1


def test_scipy_fallback_without_lapjv(monkeypatch):
    monkeypatch.setattr(A, "_lapjv_available", lambda: False)
    C = np.random.default_rng(3).standard_normal((20, 20)).astype(np.float32)
    r = A.solve_assignment_detailed(C)
    assert r.info["method"] == "scipy" and r.total == scipy_total(C)[0]
    with pytest.raises(ImportError, match="lapjv"):
        A.solve_assignment(C, method="fast")
    a, b = related_pair(30, 8, 2)
    assert M.match(a, b, cache=False).info["dec_solver"] == "scipy"
