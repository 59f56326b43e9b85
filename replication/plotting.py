"""Figure saving and shared plotting style.

Every figure is written as PNG and PDF plus a JSON with the parameters and the key numbers
it shows, all three atomically, so tests and readers can check the numbers without the image.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd

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


def save_figure(fig, name: str, params: dict[str, Any], numbers: dict[str, Any], profile: str = "default",
                dtypes: dict[str, str] | None = None) -> dict[str, Path]:
    """Save `fig` as `<name>.png` / `.pdf` and `<name>.json` (params + numbers) under the profile's figures folder.

    `dtypes` (`devices.resolved_dtypes(model_dtype, select_dtype, device)`) is recorded at
    `params.resolved_dtypes`, so a reader knows which precision produced the numbers.
    """
    if dtypes is not None:
        if set(dtypes) != {"model", "select"} or "auto" in dtypes.values():
            raise ValueError(f"dtypes must be resolved {{'model': ..., 'select': ...}}; got {dtypes!r}")
        params = {**params, "resolved_dtypes": dict(dtypes)}
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
    write_json_atomic(out / f"{name}.json", payload, strict=True)  # NaN -> null: standard JSON
    written["json"] = out / f"{name}.json"
    return written


def load_figure_json(name: str, profile: str = "default") -> dict[str, Any]:
    """Read back a figure's JSON (used by tests and the README table)."""
    from .io import read_json

    return read_json(figures_dir(profile) / f"{name}.json")


# ----------------------------------------------------------------------------------------------
# figure panels (each draws onto given axes; notebooks compose and save them)
# ----------------------------------------------------------------------------------------------
AGREE_COLOURS = {True: "tab:blue", False: "tab:orange"}
DEFINITION_STYLE = {
    "threshold": dict(color="tab:blue", ls="-"),
    "agree": dict(color="tab:green", ls="--"),
    "decoder": dict(color="tab:purple", ls=":"),
    "maxcos": dict(color="tab:red", ls="-."),
}


def cosine_scatter_kde(ax, dec_cos, enc_cos, agree, threshold: float = 0.7, max_points: int = 20_000, seed: int = 0) -> None:
    """Figure 1: each base latent at (decoder cosine, encoder cosine) of its matched partners,
    coloured by whether the encoder and decoder matchings agree, with KDE density contours."""
    import seaborn as sns

    df = pd.DataFrame({"decoder cosine": dec_cos, "encoder cosine": enc_cos,
                       "matchings": np.where(agree, "same partner", "different partners")})
    if len(df) > max_points:
        df = df.sample(max_points, random_state=seed)
    palette = {"same partner": AGREE_COLOURS[True], "different partners": AGREE_COLOURS[False]}
    sns.scatterplot(data=df, x="decoder cosine", y="encoder cosine", hue="matchings", palette=palette,
                    s=6, alpha=0.35, linewidth=0, ax=ax, rasterized=True)
    for label, sub in df.groupby("matchings"):
        if len(sub) > 10 and sub[["decoder cosine", "encoder cosine"]].std().min() > 1e-6:
            sns.kdeplot(data=sub, x="decoder cosine", y="encoder cosine", levels=6, color=palette[label],
                        linewidths=1.0, ax=ax, warn_singular=False)
    ax.axvline(threshold, color="grey", lw=0.8, ls="--")
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.05, 1.02)
    ax.set_ylim(-0.05, 1.02)
    ax.set_aspect("equal")
    ax.legend(title="encoder vs decoder matching", loc="upper left", fontsize=8, title_fontsize=8, markerscale=3)


def kseed_panels(ax_lin, ax_log, ks, only_in_base, fits: dict, errors=None) -> None:
    """Figure 2: fraction of latents found only in the base SAE vs number of seeds, with both power-law fits."""

    ks = np.asarray(ks, float)
    y = np.asarray(only_in_base, float)
    grid = np.linspace(ks.min(), ks.max(), 200)
    for ax in (ax_lin, ax_log):
        ax.errorbar(ks, y, yerr=errors, fmt="o", color="black", label="measured (exact average)", zorder=3)
        for name, colour, label in [("with_offset", "tab:blue", "a·k^b + c"), ("without_offset", "tab:orange", "a·k^b")]:
            fit = fits.get(name) or {}
            if fit.get("ok"):
                p = fit["params"]
                curve = p["a"] * grid ** p["b"] + p.get("c", 0.0)
                ax.plot(grid, curve, color=colour, label=f"{label}  (RSS {fit['rss']:.2g})")
        ax.set_xlabel("number of seeds k")
    ax_lin.set_ylabel("fraction of latents only in the base SAE")
    ax_lin.legend(fontsize=8)
    ax_log.set_xscale("log")
    ax_log.set_yscale("log")
    ax_log.set_xticks(ks)
    ax_log.set_xticklabels([str(int(k)) for k in ks])
    ax_log.set_title("log-log axes")


def threshold_sweep_panel(ax, thresholds, curves: dict, threshold: float = 0.7) -> None:
    """Figure A1 (right): fraction of shared latents vs the cosine threshold, one line per definition."""
    for definition, style in DEFINITION_STYLE.items():
        if definition in curves:
            ax.plot(thresholds, curves[definition], label=definition, **style)
    ax.axvline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("fraction of latents shared")
    ax.set_ylim(0, 1.02)
    ax.legend(title="definition", fontsize=8)


def frequency_similarity_panels(ax_scatter, ax_linear, ax_log, log10_frequency, similarity, shared_count,
                                n_other: int, n_bins: int = 40, split: float | None = None) -> None:
    """Figure 3: similarity vs log firing frequency (coloured by number of seeds shared with), and
    stacked histograms of firing frequency per shared-count group on a split count axis —
    logarithmic below `split` (rare bins stay visible) and linear above, as in the paper."""

    cmap = plt.get_cmap("viridis", n_other + 1)
    x = np.asarray(log10_frequency, float)
    groups = np.asarray(shared_count, int)
    sc = ax_scatter.scatter(x, similarity, c=groups, cmap=cmap, vmin=-0.5, vmax=n_other + 0.5, s=5, alpha=0.6, rasterized=True)
    cbar = plt.colorbar(sc, ax=ax_scatter, ticks=range(n_other + 1), pad=0.01)
    cbar.set_label("other seeds it is shared with")
    ax_scatter.set_ylabel("mean matched cosine\n(over the other seeds)")
    edges = np.linspace(np.nanmin(x), np.nanmax(x), n_bins + 1) if len(x) else np.linspace(-5, 0, n_bins + 1)
    counts = np.stack([np.histogram(x[groups == g], bins=edges)[0] for g in range(n_other + 1)])
    centres, width = 0.5 * (edges[1:] + edges[:-1]), np.diff(edges)
    total = counts.sum(0)
    split = split or (max(2.0, float(np.ceil(total.max() / 3))) if total.size else 2.0)
    for ax in (ax_linear, ax_log):
        bottom = np.zeros_like(centres)
        for g in range(n_other + 1):
            ax.bar(centres, counts[g], width=width, bottom=bottom, color=cmap(g), edgecolor="none", label=str(g))
            bottom += counts[g]
    ax_linear.set_ylim(split, max(split * 1.05, total.max() * 1.05 if total.size else split * 2))
    ax_log.set_yscale("log")
    ax_log.set_ylim(0.8, split)
    ax_log.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_log.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_linear.spines["bottom"].set_visible(False)
    ax_linear.tick_params(axis="x", which="both", bottom=False)
    ax_log.set_xlabel("log10 firing frequency (fraction of held-out tokens)")
    ax_linear.set_ylabel(f"latents\n(linear above {split:g})")
    ax_log.set_ylabel(f"latents\n(log below {split:g})")


def _sweep_axis(ax, xs, values, categorical: bool, log_x: bool) -> None:
    """Ticks at the sweep values: labels for categories, a base-2 log axis for sizes and budgets."""
    if categorical:
        ax.set_xticks(xs, [str(v) for v in values], rotation=20 if max(len(str(v)) for v in values) > 8 else 0)
    elif log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{int(v):,}" if float(v).is_integer() else str(v) for v in values], rotation=30)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def overlap_sweep_panel(ax, frame, axis: str, definitions=("threshold", "agree", "decoder"), log_x: bool = False,
                        xlabel: str | None = None, categorical: bool = False, series_label: str | None = None) -> None:
    """Figures 4-5: shared fraction per sweep point and definition, with the 95% bootstrap interval
    as error bars and each seed pair as a faint dot (the spread over seeds). `series_label` draws a second
    series on the same axes (e.g. the sweep at another budget): dashed, open markers, labels prefixed."""

    values = list(dict.fromkeys(frame[axis]))
    xs = np.arange(len(values)) if categorical else np.asarray(values, dtype=float)
    offsets = np.linspace(-0.12, 0.12, len(definitions)) if categorical else np.zeros(len(definitions))
    for off, d in zip(offsets, definitions):
        sub = frame[frame.definition == d].set_index(axis).loc[values]
        style = DEFINITION_STYLE.get(d, {})
        y = sub.shared.to_numpy()
        err = np.vstack([y - sub.ci_low.to_numpy(), sub.ci_high.to_numpy() - y]).clip(min=0)
        wide = d == "threshold" and series_label is None   # wide and pale so that `agree` (often identical) stays visible
        ls = "none" if categorical else ("--" if series_label else style.get("ls", "-"))
        ax.errorbar(xs + off, y, yerr=err, marker="o", ms=7 if wide else 5, capsize=3,
                    label=f"{d} ({series_label})" if series_label else d, color=style.get("color"), ls=ls,
                    lw=4 if wide else 1.5, alpha=0.45 if wide else 1.0, mfc="white" if series_label else None)
        if "per_pair" in sub:
            for x, pairs in zip(xs + off, sub.per_pair):
                ax.scatter(np.full(len(pairs), x), pairs, s=6, alpha=0.25, color=style.get("color"), lw=0)
    _sweep_axis(ax, xs, values, categorical, log_x)
    ax.set_xlabel(xlabel or axis)
    ax.set_ylabel("fraction of latents shared")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)


def token_label(n: float) -> str:
    """A token count as a short tick label: 125000 -> "125k", 4000000 -> "4M", 1500000 -> "1.5M"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def convergence_panel(ax, series: dict[str, dict[str, Any]], ylabel: str, ylim: tuple[float, float] | None = None,
                      xlabel: str = "training tokens (separate runs, a full schedule each)", connect: bool = False,
                      log_y: bool = False) -> None:
    """Notebooks 16 and 17: one statistic against training tokens, one series per label. A series holds
    `budgets`, `values`, `ci95` ([low, high] per point, seed-level), optionally `fit`
    (`convergence.fit_plateau`: its curve; where identified, its plateau dotted and the plateau interval shaded)
    and `floor` (a baseline drawn as a dashed line in the series' colour). `connect` joins the points
    (checkpoints of the same runs, notebook 17). Ticks sit at the budgets ("125k", "4M"); `log_y` for a
    statistic that spans decades (an L0 that starts dense)."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, s), colour in zip(series.items(), colours):
        b, y = np.asarray(s["budgets"], float), np.asarray(s["values"], float)
        ci = np.asarray(s["ci95"], float)
        err = np.vstack([y - ci[:, 0], ci[:, 1] - y]).clip(min=0)
        ax.errorbar(b, y, yerr=err, marker="o", ls="-" if connect else "none", capsize=3, color=colour, label=label)
        if s.get("floor") is not None:
            ax.axhline(s["floor"], color=colour, ls="--", lw=1, alpha=0.7)
        fit = s.get("fit") or {}
        if fit.get("ok"):
            ax.plot(fit["curve"]["budgets"], fit["curve"]["values"], color=colour, lw=1.2)
        if fit.get("ok") and fit.get("identified"):   # no line where the curve shows no sign of saturating
            ax.axhline(fit["plateau"], color=colour, ls=":", lw=1)
            if fit.get("plateau_ci95"):
                ax.axhspan(*fit["plateau_ci95"], color=colour, alpha=0.08, lw=0)
    ax.set_xscale("log")
    budgets = sorted({float(b) for s in series.values() for b in s["budgets"]})
    ax.set_xticks(budgets, [token_label(b) for b in budgets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if log_y:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")   # 20, 300: not 2x10^1, 3x10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)


def a3_panel(ax, frame, axis: str, log_x: bool = False, xlabel: str | None = None, categorical: bool = False) -> None:
    """Figure A3: mean Hungarian-matched cosine vs mean max cosine (decoder and encoder) per sweep point."""

    sub = frame.drop_duplicates(axis).set_index(axis)
    values = list(sub.index)
    xs = np.arange(len(values)) if categorical else np.asarray(values, dtype=float)
    for part, colour in (("dec", "tab:purple"), ("enc", "tab:olive")):
        ax.plot(xs, sub[f"mean_matched_{part}"], marker="o", color=colour, label=f"{part}oder: Hungarian")
        ax.plot(xs, sub[f"mean_max_{part}"], marker="x", ls="--", color=colour, label=f"{part}oder: max cosine")
    _sweep_axis(ax, xs, values, categorical, log_x)
    ax.set_xlabel(xlabel or axis)
    ax.set_ylabel("mean cosine over latents")
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- Figure 6 panels
def score_panel(ax, scores: pd.DataFrame, n_other: int, overlay: pd.DataFrame | None = None,
                label: str = "lexical", overlay_label: str = "LLM") -> None:
    """Figure 6 left: score distribution per shared count (boxes), optional overlay points."""
    groups = [scores.loc[scores.shared_count == c, "balanced_accuracy"].dropna().to_numpy() for c in range(n_other + 1)]
    keep = [i for i, g in enumerate(groups) if len(g)]
    ax.boxplot([groups[i] for i in keep], positions=keep, widths=0.6, showfliers=False,
               medianprops={"color": "tab:blue"})
    ax.plot([], [], color="tab:blue", label=f"{label} (boxes)")
    if overlay is not None and len(overlay.dropna(subset=["balanced_accuracy"])):
        o = overlay.dropna(subset=["balanced_accuracy"])
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(o))
        ax.scatter(o.shared_count + jitter, o.balanced_accuracy, s=22, color="tab:red", zorder=3, label=overlay_label)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"number of other seeds the latent is shared with (of {n_other})")
    ax.set_ylabel("detection score (balanced accuracy)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")


def pair_panel(ax, pairs: pd.DataFrame, title: str, size: float = 8) -> Any:
    """Figure 6 right: seed-1 vs seed-2 scores of matched pairs, coloured by alignment."""
    p = pairs.dropna(subset=["score_1", "score_2"])
    sc = ax.scatter(p.score_1, p.score_2, c=p.alignment, cmap="viridis", vmin=0, vmax=1, s=size, alpha=0.8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("score, seed 1")
    ax.set_ylabel("score of its matched latent, seed 2")
    ax.set_title(title)
    return sc
