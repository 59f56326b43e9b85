"""The `sae-seeds` command (also `python -m replication`).

    sae-seeds compare A B [C ...] [--out DIR] [--activations PATH] ...   measure seed stability
    sae-seeds export SRC DEST [--layout sparsify|saelens]                write a checkpoint for another library
    sae-seeds example FAMILY_DIR --out DIR                                the README's example report

Errors in the inputs (different d_in, unknown layout, corrupt or NaN weights, fewer than two
SAEs) print one line to stderr and exit with status 2; no report is written then.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import paths
from .analysis.matching import DEFAULT_THRESHOLD, DEFINITIONS

USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, TypeError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with the `compare`, `export` and `example` subcommands."""
    parser = argparse.ArgumentParser(prog="sae-seeds", description="Are my SAEs stable? Compare SAEs that differ "
                                     "only in their seed (Paulo & Belrose: Hungarian matching of latents).")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="match two or more SAE checkpoints and write a report folder")
    cmp.add_argument("saes", nargs="+", help="SAE folders (sparsify, SAELens or dictionary_learning layout), "
                     "'.../seed*' globs, or Hugging Face Hub ids owner/repo[/folder]")
    cmp.add_argument("--out", default="sae_seeds_report", help="report folder (replaced atomically; default %(default)s)")
    cmp.add_argument("--names", nargs="+", help="display names, one per SAE (default: paths minus their common folder)")
    cmp.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cosine threshold (default %(default)s)")
    cmp.add_argument("--definition", choices=DEFINITIONS, default="threshold",
                     help="definition for labels, reappearance and the k-seed curve (default %(default)s)")
    cmp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default %(default)s)")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the chance baseline")
    cmp.add_argument("--eps", type=float, default=0.05, help="stable if p >= 1-eps, unstable if p <= eps")
    cmp.add_argument("--activations", help="activation array (.npy/.pt/.safetensors) or one of our activation "
                     "caches: adds FVU, L0 and firing frequencies per SAE")
    cmp.add_argument("--hook", help="hook of a multi-hook activation cache")
    cmp.add_argument("--split", default="heldout", choices=("heldout", "train"), help="activation cache split")
    cmp.add_argument("--max-tokens", type=int, help="use only the first N activation rows")
    cmp.add_argument("--cache-dir", help="cache matchings in this folder (reused by later runs)")
    cmp.add_argument("--no-plots", action="store_true", help="skip the PNG/PDF figures")
    cmp.add_argument("--quiet", action="store_true", help="no progress lines, only the summary table")
    exp = sub.add_parser("export", help="write one of our checkpoints in sparsify's or SAELens' layout "
                         "(input scale folded into the weights)")
    exp.add_argument("src", help="checkpoint folder")
    exp.add_argument("dest", help="output folder")
    exp.add_argument("--layout", choices=("sparsify", "saelens"), default="sparsify")
    exp.add_argument("--no-fold", action="store_true", help="keep input_scale out of the weights (not recommended)")
    exp.add_argument("--hook-name", default="", help="SAELens metadata.hook_name")
    ex = sub.add_parser("example", help="the README example: seeds of a family exported to SAELens and compared")
    ex.add_argument("family_dir", help="data/saes/<family> holding seed0, seed1, ..., or a profile name "
                                       "(e.g. 'default': its core family and activation cache)")
    ex.add_argument("--out", required=True, help="report folder, e.g. figures/examples/core_seed0_seed1")
    ex.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ex.add_argument("--export-dir", help="keep the exported SAELens folders here")
    ex.add_argument("--activations", help="activation cache or array for FVU / firing frequencies")
    ex.add_argument("--hook", help="hook of a multi-hook activation cache")
    return parser


def core_family_of(profile: str) -> tuple[str, str]:
    """(checkpoint folder, activation cache folder) of a profile's core family, with dtypes resolved here."""
    from .experiments import FamilySpec, family_dir
    from .lm.activations import cache_folder

    spec = FamilySpec.from_profile(profile)
    return str(family_dir(spec)), str(cache_folder(spec.activation_settings()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            from .compare import compare_saes

            report = compare_saes(args.saes, names=args.names, threshold=args.threshold, definition=args.definition,
                                  n_boot=args.n_boot, seed=args.seed, eps=args.eps, activations=args.activations,
                                  hook=args.hook, split=args.split, max_tokens=args.max_tokens,
                                  cache=args.cache_dir is not None, cache_dir=args.cache_dir, out_dir=args.out,
                                  plots=not args.no_plots, progress=not args.quiet)
            print(report.table())
            print(f"report: {Path(args.out)}/ (report.json, per_latent.csv, pairs.csv"
                  + (", figures" if not args.no_plots else "") + ")")
        elif args.command == "export":
            from .sae.checkpoints import export_sae

            folder = export_sae(args.src, args.dest, layout=args.layout, hook_name=args.hook_name,
                                fold_scale=not args.no_fold)
            print(f"exported {args.src} -> {folder} ({args.layout} layout)")
        else:
            from .compare import example_report

            if not Path(args.family_dir).exists() and args.family_dir in paths.profile_names():
                args.family_dir, cache = core_family_of(args.family_dir)
                args.activations = args.activations or cache
            report = example_report(args.family_dir, args.out, seeds=args.seeds, export_dir=args.export_dir,
                                    activations=args.activations, hook=args.hook, progress=True)
            print(report.table())
            print(f"report: {Path(args.out)}/")
    except USER_ERRORS as err:
        print(f"sae-seeds {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def main_entry() -> None:
    """Console-script entry point (`sae-seeds`): exits with `main`'s status."""
    sys.exit(main())
