"""Notebook 16's convergence study: separate full schedules per budget, and a plateau fit that can say "no"."""
from __future__ import annotations

import numpy as np
import pytest

from replication.experiments import FamilySpec
from replication.studies import convergence


def test_budget_specs_are_separate_full_schedules() -> None:
    base = FamilySpec()
    grid = convergence.budget_specs(base, [1024, 256], [2_000_000, 1_000_000], seeds=[0, 1, 2, 3])
    assert sorted(grid) == [(256, 1_000_000), (256, 2_000_000), (1024, 1_000_000), (1024, 2_000_000)]
    for (n, budget), spec in grid.items():
        # its own schedule: the budget is the run's n_tokens, with no intermediate checkpoints to stand in for it
        assert spec.n_latents == n and spec.n_tokens == budget and spec.checkpoint_at_tokens == ()
        assert spec.seeds == (0, 1, 2, 3)
    # the family at the core budget is the core family itself (same weights key): trained once
    assert grid[(1024, 1_000_000)].training_key() == FamilySpec(n_tokens=1_000_000).training_key()
    with pytest.raises(ValueError, match="at least 2 seeds"):
        convergence.budget_specs(base, [256], [1_000_000], seeds=[0])
    with pytest.raises(ValueError, match="positive"):
        convergence.budget_specs(base, [256], [0], seeds=[0, 1])


def _draws(values: np.ndarray, sd: float, n: int = 300, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [v + sd * rng.standard_normal(n) for v in values]


BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000, 32_000_000]


def test_plateau_of_a_saturating_curve_is_recovered_with_an_interval_that_covers_it() -> None:
    t = np.asarray(BUDGETS) / 1e6
    truth = convergence.saturating(t, 0.55, 0.4, 0.8)
    fit = convergence.fit_plateau(BUDGETS, truth, _draws(truth, 0.01), plateau_bounds=(0, 1))
    assert fit["ok"] and fit["identified"]
    assert fit["plateau"] == pytest.approx(0.55, abs=1e-4) and fit["rate"] == pytest.approx(0.8, abs=1e-3)
    lo, hi = fit["plateau_ci95"]
    assert lo < 0.55 < hi and hi - lo < 0.1
    assert fit["gap_to_plateau"][-1] == pytest.approx(0.55 - truth[-1], abs=1e-4)
    # FVU falls to its plateau (negative amplitude); the same fit handles it
    fvu = convergence.saturating(t, 0.2, -0.15, 0.6)
    f2 = convergence.fit_plateau(BUDGETS, fvu, plateau_bounds=(0, np.inf))
    assert f2["identified"] and f2["plateau"] == pytest.approx(0.2, abs=1e-4)


def test_a_curve_that_has_not_begun_to_saturate_has_no_plateau() -> None:
    """A shared fraction still rising by the same step per doubling (straight on a log axis) must not be given
    a plateau, nor may any budget be called near it: the old rule ("fit, read off the plateau") would."""
    y = 0.05 + 0.08 * np.log2(np.asarray(BUDGETS) / 1e6)
    fit = convergence.fit_plateau(BUDGETS, y, _draws(y, 0.01), plateau_bounds=(0, 1))
    assert fit["ok"] and not fit["identified"] and fit["plateau_ci95"] is None
    assert convergence.within(fit, len(BUDGETS) - 1, 0.03) is None
    # an accelerating curve (the smoke profile's) pins the plateau to its bound: not identified either
    acc = np.array([0.0, 0.0, 0.03, 0.27, 0.5, 0.7])
    assert not convergence.fit_plateau(BUDGETS, acc, plateau_bounds=(0, 1))["identified"]


def test_within_tolerance_reads_the_far_end_of_the_plateau_interval() -> None:
    t = np.asarray(BUDGETS) / 1e6
    truth = convergence.saturating(t, 0.5, 0.3, 1.0)
    fit = convergence.fit_plateau(BUDGETS, truth, _draws(truth, 0.002), plateau_bounds=(0, 1))
    gaps = 0.5 - truth
    assert convergence.within(fit, 5, 0.03) is bool(gaps[5] + 0.01 <= 0.03)   # 32M: gap ~0.009
    assert convergence.within(fit, 0, 0.03) is False                         # 1M: gap 0.3
    with pytest.raises(ValueError, match="at least 4 budgets"):
        convergence.fit_plateau(BUDGETS[:3], truth[:3])
    with pytest.raises(ValueError, match="increasing"):
        convergence.fit_plateau(BUDGETS[::-1], truth)


def test_convergence_panel_labels_budgets_as_token_counts() -> None:
    """Ticks sit at the budgets with short labels, not at matplotlib's overlapping 2x10^5 minor labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from replication import plotting

    assert [plotting.token_label(n) for n in (800, 125_000, 1_000_000, 1_500_000, 4_000_000, 8e9)] == \
        ["800", "125k", "1M", "1.5M", "4M", "8B"]
    fig, ax = plt.subplots()
    budgets = [125_000, 250_000, 500_000, 1_000_000, 4_000_000]
    series = {"a": {"budgets": budgets, "values": [40, 30, 31, 32, 480], "ci95": [[v, v] for v in (40, 30, 31, 32, 480)]}}
    plotting.convergence_panel(ax, series, "L0", log_y=True)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["125k", "250k", "500k", "1M", "4M"]
    assert ax.get_yscale() == "log" and not ax.xaxis.get_minor_ticks()
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels() if t.get_text()]
    assert labels and not any("times" in text or "^" in text for text in labels), labels   # plain numbers
    plt.close(fig)
