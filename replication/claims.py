"""The "does it hold here?" table every notebook ends with: one helper builds it from claim rows.

Each row names the claim, what the reference says (`paper`, or `study` for the companion studies),
our number with its interval (`ours`), and the verdict (`holds`: a bool, or a phrase where the
comparison is not a yes/no, e.g. "scale differs"). `effect_row` writes the row of an interval-based
comparison (Figures 4 and 5); `table` checks every row and returns the DataFrame.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

REFERENCES = ("paper", "study")


def effect_row(claim: str, paper: str, effect: Mapping[str, Any], expected_sign: int, what: str = "") -> dict[str, Any]:
    """One row of a notebook's "does it hold" table: the paper's direction, ours with its
    interval, and whether it holds (same sign and the 95% interval excludes zero).
    `expected_sign=0` marks a comparison the paper states no direction for: it is reported,
    never scored as holding or failing."""
    if expected_sign not in (-1, 0, 1):
        raise ValueError(f"expected_sign must be -1, 0 or +1, got {expected_sign!r}")
    ends = effect if "difference" in effect else effect["first_to_last"]
    diff = ends["difference"]
    lo, hi = ends["ci95_seed"] if "ci95_seed" in ends else ends["ci95"]   # seed-level when recorded: seeds, then latents
    if expected_sign == 0:
        verdict = "no paper direction: " + ("resolved" if lo > 0 or hi < 0 else "interval includes 0")
    else:
        verdict = interval_verdict(diff, lo, hi, expected_sign)
    ours = f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" (seeds and latents resampled)" if "ci95_seed" in ends else "")
    if "spearman_rho" in effect and effect["spearman_rho"] is not None:
        ours += f", Spearman {effect['spearman_rho']:+.2f}"
    return {"claim": claim, "paper": paper, "ours": (what + " " if what else "") + ours, "holds": verdict}


def interval_verdict(estimate: float, low: float, high: float, expected_sign: int = 1) -> str:
    """The verdict of a claim read off an interval: "yes" when the interval excludes 0 and the estimate has
    the expected sign, "opposite" when it excludes 0 with the other sign, else "not resolved (interval includes 0)"."""
    if expected_sign not in (-1, 1):
        raise ValueError(f"expected_sign must be -1 or +1, got {expected_sign!r}")
    if low > 0 or high < 0:
        return "yes" if np.sign(estimate) == expected_sign else "opposite"
    return "not resolved (interval includes 0)"


def tested_verdict(estimate: float | None, p_value: float | None, expected_sign: int = 1, alpha: float = 0.05) -> str:
    """The verdict of a claim tested by a p-value: "yes" when the estimate has the expected sign and
    p < `alpha`, "opposite" when it has the other sign and p < `alpha`, else "not resolved (p = ...)".
    A bare comparison of point estimates would call a difference of either sign half the time under the null."""
    if expected_sign not in (-1, 1):
        raise ValueError(f"expected_sign must be -1 or +1, got {expected_sign!r}")
    if estimate is None or p_value is None or not (np.isfinite(estimate) and np.isfinite(p_value)):
        return "not testable: no estimate"
    if p_value < alpha and estimate != 0:
        return "yes" if np.sign(estimate) == expected_sign else "opposite"
    return f"not resolved (p = {p_value:.3f})"


def table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The claims table: every row has `claim`, `ours` and `holds`, and usually the reference's value
    (`paper` or `study`; Figure 6 puts it in the claim text); extra columns, e.g. `scorer`, are kept.
    A malformed row is a clear error, not a silent gap."""
    for i, row in enumerate(rows):
        missing = [k for k in ("claim", "ours", "holds") if k not in row]
        if missing:
            raise ValueError(f"claim row {i} ({row.get('claim', '?')!r}) is missing {missing}")
        if not isinstance(row["holds"], (bool, np.bool_, str)):
            raise ValueError(f"claim row {i}: holds must be a bool or a phrase, got {type(row['holds']).__name__}")
    frame = pd.DataFrame(list(rows))
    first = ["claim", *[r for r in REFERENCES if r in frame], "ours", "holds"]
    return frame[first + [c for c in frame.columns if c not in first]]
