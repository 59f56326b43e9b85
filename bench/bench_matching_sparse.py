"""Benchmark: the certified sparse matching (no dense matrix) vs the dense exact route, and at 2^17.

Usage: python bench/bench_matching_sparse.py [--sizes 32768 131072] [--dense-up-to 32768] [--m 16] [--d 768]

Each run is a fresh subprocess on the same SAE-like pair as bench_matching.py (`sae_like_pair`: half of
B's rows noisy copies of A's rows, the rest independent; d = 768, Pythia-160M's width, the paper's
Figure 4 model). "dense" = `cosine_matrix` + `solve_assignment_detailed(method="fast")` (float32 n x n
matrix: 4 GiB at 2^15, 64 GiB at 2^17, so it stops at --dense-up-to); "sparse" =
`sparse_assignment.match_sparse` (top-m candidates per row and column in float32 blocks, float64
values, LAPJVsp, float64 dual certificate). Totals are both assignments' summed float64 cosines, so
"same total" compares the optimum itself; "same perm" the assignments. "peak GB" is the child's
ru_maxrss (inputs included).

Measured on this project's machine (2 CPU cores, 24 GiB RAM): see the README's benchmark table; the
numbers of the last run are printed, ratio first.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(solver: str, n: int, d: int, m: int, seed: int, out_npy: str) -> dict:
    from bench_matching import sae_like_pair

    from replication.analysis.sparse_assignment import _unit64, match_sparse

    A, B = sae_like_pair(n, d, shared=0.5, seed=seed)
    t0 = time.perf_counter()
    info: dict = {}
    if solver == "dense":
        from replication.analysis.assignment import solve_assignment_detailed
        from replication.analysis.matching import cosine_matrix

        C = cosine_matrix(A, B, normalized=True)
        col = solve_assignment_detailed(C, method="fast", overwrite=True).col_for_row
        del C
    else:
        r = match_sparse(A, B, m=m, device="auto", progress=False)
        col = r.col_for_row
        info = {"t_candidates": round(r.info["t_candidates"], 1), "rounds": len(r.info["rounds"]),
                "rows_checked": [x["rows_checked_in_full"] for x in r.info["rounds"]],
                "entries_added": [x["entries_added"] for x in r.info["rounds"]],
                "n_candidates": r.info["rounds"][-1]["n_candidates"], "device": r.info["device"]}
    t = time.perf_counter() - t0
    A64, B64 = _unit64(A), _unit64(B)
    total = math.fsum(np.einsum("ij,ij->i", A64, B64[col]).tolist())
    np.save(out_npy, np.asarray(col, np.int64))
    return {"solver": solver, "n": n, "t": t, "total": total,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "info": info}


def run(solver: str, n: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{solver}_{n}.npy"
    cmd = [sys.executable, __file__, "--child", solver, "--n", str(n), "--d", str(args.d), "--m", str(args.m),
           "--seed", str(args.seed), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-400:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["col"] = np.load(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--dense-up-to", type=int, default=32768)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.d, args.m, args.seed, args.out)))
        return
    import tempfile

    print(f"d={args.d} m={args.m} seed={args.seed} (SAE-like pair, half shared)")
    head = (f"{'n':>7} | {'sparse s':>8} {'peak GB':>7} | {'dense s':>7} {'peak GB':>7} | "
            f"{'sparse/dense time':>17} {'same total':>10} {'same perm':>9}")
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as td:
        for n in args.sizes:
            sp = run("sparse", n, args, Path(td))
            if "error" in sp:
                print(f"{n:>7} | sparse failed: {sp['error']}", flush=True)
                continue
            de = run("dense", n, args, Path(td)) if n <= args.dense_up_to else {"skipped": True}
            if "t" in de:
                tail = (f"{de['t']:>7.1f} {de['peak_gb']:>7.2f} | {sp['t'] / de['t']:>16.2f}x "
                        f"{str(sp['total'] == de['total']):>10} {str(bool(np.array_equal(sp['col'], de['col']))):>9}")
                if sp["total"] != de["total"]:
                    tail += f"  (sparse - dense = {sp['total'] - de['total']:.3e})"
            else:
                need = 4 * n * n / 2**30
                tail = f"{'-':>7} {'-':>7} |   dense not run: its float32 matrix alone needs {need:.0f} GiB"
            print(f"{n:>7} | {sp['t']:>8.1f} {sp['peak_gb']:>7.2f} | {tail}", flush=True)
            print(f"          sparse: {sp['info']}", flush=True)


if __name__ == "__main__":
    main()
