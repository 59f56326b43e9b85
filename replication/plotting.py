"""Figure saving and shared plotting style.

Every figure is written as PNG and PDF plus a JSON with the parameters and the key numbers
it shows, all three atomically, so tests and readers can check the numbers without the image.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path, write_json_atomic  # noqa: E402
from .paths import figures_dir  # noqa: E402

PAPER_STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.frameon": False,
}


def use_style() -> None:
    """Apply the project's plotting style (readable axes, no chart junk)."""
    plt.rcParams.update(PAPER_STYLE)


def save_figure(fig, name: str, params: dict[str, Any], numbers: dict[str, Any], profile: str = "default") -> dict[str, Path]:
    """Save `fig` as `<name>.png` / `.pdf` and `<name>.json` (params + numbers) under the profile's figures folder."""
    out = figures_dir(profile)
    written: dict[str, Path] = {}
    for ext in ("png", "pdf"):
        final = out / f"{name}.{ext}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight")
        written[ext] = final
    payload = {
        "figure": name,
        "profile": profile,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": params,
        "numbers": numbers,
    }
    write_json_atomic(out / f"{name}.json", payload)
    written["json"] = out / f"{name}.json"
    return written


def load_figure_json(name: str, profile: str = "default") -> dict[str, Any]:
    """Read back a figure's JSON (used by tests and the README table)."""
    from .io import read_json

    return read_json(figures_dir(profile) / f"{name}.json")
