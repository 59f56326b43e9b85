"""Inject each notebook's smoke parameters for `make nbval`, in one process.

`papermill --prepare-only` once per notebook started 18 Python processes (~1 s each on a 2-core
CPU, every one importing papermill); the API does the same injection in one.

    python tests/nbval_prepare.py OUT_DIR NOTEBOOK... [--profile smoke] [--dtype float32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import papermill
import yaml


def prepare(notebooks: list[Path], out_dir: Path, profile: str = "smoke", dtype: str = "auto") -> list[Path]:
    """Write each notebook to `out_dir` with `profile`, its `params/<name>/<profile>.yaml` and (unless
    `dtype` is auto) a forced model and selection dtype injected as papermill parameters."""
    written = []
    for notebook in notebooks:
        params_file = notebook.parent / "params" / notebook.stem / f"{profile}.yaml"
        if not params_file.is_file():
            raise FileNotFoundError(f"{notebook.name}: no parameters for profile {profile!r} at {params_file}")
        params = {"profile": profile, **(yaml.safe_load(params_file.read_text()) or {})}
        if dtype != "auto":
            params.update(model_dtype=dtype, select_dtype=dtype)
        out = out_dir / notebook.name
        papermill.execute_notebook(str(notebook), str(out), parameters=params, prepare_only=True,
                                   kernel_name="python3", log_output=False, progress_bar=False)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--dtype", default="auto", help="auto (the profiles' own), float32 or bfloat16")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prepare(args.notebooks, args.out_dir, args.profile, args.dtype)


if __name__ == "__main__":
    main()
