"""Are my SAEs stable? Measure two or more SAE checkpoints that differ only in their seed.

`compare_saes(paths_or_objects)` joins the pieces the figure notebooks use -- `matching.match`
(Hungarian matching, decoder and encoder separately), `matching.shared_masks`,
`stats.bootstrap_ci`, `stability.chance_shared_fractions`, `stats.bimodality`, the exact
k-seed curve with `stats.fit_power_law`, and `per_latent.stability_classes` -- into one
`Report`, which `Report.write(folder)` saves atomically as

    report.json        every number (shared fractions with bootstrap intervals, chance, PW-MCC and
                       its untrained baseline, agree/disagree cosines, bimodality, k-seed fits,
                       FVU and firing frequencies with --activations)
    per_latent.csv     one row per (SAE, latent): partner and cosines in every other SAE,
                       reappearance probability, stable / unstable label (+ firing frequency)
    pairs.csv          one row per pair: shared fractions, PW-MCC, agreement, mean cosines
    fig1_cosines.png/.pdf, fig2_kseed.png/.pdf (the latter for 3 or more SAEs)

Inputs are folders in the sparsify, SAELens or dictionary_learning layout, `.../seed*` globs,
Hugging Face Hub ids (downloaded; offline this fails with one message), or in-memory SAEs (ours,
sparsify `SparseCoder`, SAELens `SAE`, dictionary_learning `AutoEncoder`, or `LatentDirections`).

Definitions (SPEC section 2): for every pair (i, j) with i listed first, SAE i is the base; the
headline shared fraction pools the base latents of all pairs (for two SAEs it is exactly notebook
01's number for that pair). PW-MCC is the mean cosine of the Hungarian-matched decoder directions,
averaged over pairs; its baseline is the same statistic for two untrained SAEs of the same shape
at their seeded initialisation (`architectures.build_sae(..., seed=0 / 1)`).
"""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .analysis.matching import (
    DEFAULT_THRESHOLD,
    DEFINITIONS,
    MatchResult,
    agreement_fraction,
    match,
    shared_masks,
)
from .io import write_json_atomic
from .sae.architectures import SAEBase
from .sae.directions import LatentDirections

REPORT_DEFINITIONS: tuple[str, ...] = ("threshold", "agree", "decoder")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^(?:hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(?:/[\w./-]+)?$")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedSAE:
    """One input: display name, where it came from, its directions and (when readable whole) the SAE."""

    name: str
    source: str
    directions: LatentDirections
    sae: SAEBase | None = None
    layout: str = ""


def _natural_key(text: str) -> list[Any]:
    """Sort key that puts seed2 before seed10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def expand_inputs(items: Sequence[Any]) -> list[Any]:
    """Expand string globs (`.../seed*`) in natural order; other items pass through unchanged."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, (str, Path)) and _GLOB_CHARS.search(str(item)) and not Path(item).exists():
            hits = sorted(glob.glob(str(item)), key=_natural_key)
            if not hits:
                raise FileNotFoundError(f"no checkpoint matches the pattern {item}")
            out.extend(hits)
        else:
            out.append(item)
    return out


def download_from_hub(hub_id: str) -> Path:
    """Local folder of `owner/repo[/sub/folder]` on the Hugging Face Hub (downloaded once, then cached).

    Offline, or for an unknown id, this raises one `ValueError` that says so.
    """
    hub_id = hub_id.removeprefix("hf://")
    parts = hub_id.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None))
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: one message for all
        raise ValueError(f"{hub_id!r} is not a local path, and downloading it from the Hugging Face Hub failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         f"without a network, download the checkpoint elsewhere and pass its folder") from err
    folder = local / sub if sub else local
    if not folder.exists():
        raise ValueError(f"Hugging Face repo {repo!r} has no folder {sub!r}")
    return folder


def load_input(item: Any, name: str) -> LoadedSAE:
    """Read one input (path, hub id, SAE object or LatentDirections) as a `LoadedSAE`.

    Paths are read whole with `checkpoints.load_sae` (every layout); an architecture it cannot
    rebuild falls back to directions only (`checkpoints.load_directions`), without FVU.
    """
    from .sae.checkpoints import detect_layout, load_directions, load_sae, sae_from_object

    if isinstance(item, LatentDirections):
        return LoadedSAE(name, "LatentDirections", LatentDirections(item.encoder, item.decoder, name=name,
                                                                    meta=dict(item.meta)), None, "directions")
    if not isinstance(item, (str, Path)):
        sae = sae_from_object(item, what=name)
        return LoadedSAE(name, type(item).__name__, sae.latent_directions(name=name), sae, type(item).__module__)
    path = Path(item)
    source = str(item)
    if not path.exists():
        if isinstance(item, str) and _HUB_ID.match(item) and not item.startswith((".", "/")):
            path = download_from_hub(item)
        else:
            raise FileNotFoundError(f"SAE path does not exist: {item}")
    layout, folder = detect_layout(path)
    try:
        sae = load_sae(folder)
    except NotImplementedError:
        directions = load_directions(folder, name=name)
        return LoadedSAE(name, source, directions, None, layout)
    directions = sae.latent_directions(name=name)
    directions.meta.update({"layout": layout, "path": str(folder)})
    return LoadedSAE(name, source, directions, sae, layout)


def default_names(items: Sequence[Any]) -> list[str]:
    """Short unique display names: paths without their common parent folder, objects `sae<i>`."""
    strs = [str(x) if isinstance(x, (str, Path)) else None for x in items]
    paths = [s for s in strs if s is not None]
    common = ""
    if len(paths) > 1:
        try:
            common = os.path.commonpath([os.path.abspath(p) for p in paths])
        except ValueError:
            common = ""
    names = []
    for i, s in enumerate(strs):
        if s is None:
            names.append(f"sae{i}")
            continue
        rel = os.path.relpath(os.path.abspath(s), common) if common else s
        names.append(s if rel in (".", "") else rel)
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def load_activations(path: Path | str, hook: str | None = None, split: str = "heldout") -> np.ndarray:
    """An activation array `[n_tokens, d_in]` from a `.npy`, `.pt` or `.safetensors` file, or one of
    our activation caches (a folder with `manifest.json`: the `split` of `hook`, or of its only hook)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activations not found: {path}")
    if path.is_dir():
        from .lm.activations import ActivationCache

        cache = ActivationCache.open(path, verify=False)
        if hook is None:
            if len(cache.hooks) != 1:
                raise ValueError(f"{path} caches several hooks {cache.hooks}; choose one with --hook")
            hook = cache.hooks[0]
        return cache.array(hook, split)
    if path.suffix == ".npy":
        arr: Any = np.load(path, mmap_mode="r")
    elif path.suffix in (".pt", ".pth"):
        arr = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1 and "activations" not in tensors:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; expected one, or one named 'activations'")
        arr = tensors.get("activations", next(iter(tensors.values())))
    else:
        raise ValueError(f"unsupported activation file {path}: use .npy, .pt, .safetensors or an activation cache folder")
    if isinstance(arr, torch.Tensor):
        arr = arr.float().numpy()
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise ValueError(f"activations in {path} must be a 2-D [n_tokens, d_in] array; got "
                         f"{getattr(arr, 'shape', type(arr).__name__)}")
    return arr


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Everything `compare_saes` measured. `summary` is the JSON content; `per_latent` and `pairs`
    are the CSV tables; `matchings[(i, j)]` the raw `MatchResult` of SAE i (base) to SAE j."""

    names: list[str]
    summary: dict[str, Any]
    per_latent: pd.DataFrame
    pairs: pd.DataFrame
    matchings: dict[tuple[int, int], MatchResult] = field(default_factory=dict)
    kseed: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def shared_fraction(self) -> dict[str, float]:
        """Headline shared fraction per definition (pooled over pairs, each pair's first SAE as base)."""
        return {d: v["estimate"] for d, v in self.summary["shared_fraction"].items()}

    def table(self) -> str:
        """The short plain-text summary the command prints at the end."""
        s = self.summary
        lines = [f"{len(self.names)} SAEs, {s['n_latents']} latents, d_in {s['d_in']}, threshold {s['threshold']}"]
        rows = []
        for d in REPORT_DEFINITIONS:
            v = s["shared_fraction"][d]
            rows.append((f"shared ({d})", f"{v['estimate']:.3f}", f"[{v['low']:.3f}, {v['high']:.3f}]",
                         f"{s['chance_shared_fraction'][d]:.3f}"))
        pw = s["pw_mcc"]
        rows.append(("PW-MCC (matched decoder cosine)", f"{pw['trained']:.3f}", "", f"{pw['untrained']:.3f}"))
        ad = s["agree_disagree"]
        rows.append(("mean cosine, same / different partner", f"{_fmt(ad['mean_cos_agree'])} / "
                     f"{_fmt(ad['mean_cos_disagree'])}", f"agree {ad['agreement_fraction']:.3f}", ""))
        bm = s["bimodality"]
        if "delta_bic_1_minus_2" in bm:
            rows.append(("bimodality (dBIC, Sarle b)", f"{bm['delta_bic_1_minus_2']:.0f}, "
                         f"{bm['sarle_coefficient']:.2f}", "bimodal" if bm["bimodal"] else "not bimodal", ""))
        ks = s.get("kseed")
        if ks:
            curve = ks["curves"][ks["definition"]]
            last = max(curve, key=int)
            fit = ks["fits"].get(ks["definition"]) or {}
            c = ((fit.get("with_offset") or {}).get("params") or {}).get("c")
            rows.append((f"only in base at k = {last}", f"{curve[last]:.3f}",
                         f"offset c = {c:.3f}" if c is not None else "no fit (< 5 SAEs)", ""))
        width = max(len(r[0]) for r in rows)
        lines.append(f"{'':<{width}}  {'value':>16}  {'95% CI / note':<22}  {'chance / untrained'}")
        lines += [f"{a:<{width}}  {b:>16}  {c:<22}  {d}" for a, b, c, d in rows]
        per = s.get("per_sae", {})
        if any("fvu" in v for v in per.values()):
            lines.append("per SAE: " + "; ".join(
                f"{n}: FVU {v['fvu']:.4f}, L0 {v['l0']:.1f}, dead {v['dead_fraction']:.3f}" for n, v in per.items()
                if "fvu" in v))
        return "\n".join(lines)

    def write(self, out_dir: Path | str, plots: bool = True) -> Path:
        """Write the report folder atomically: everything goes to a temporary sibling folder that is
        renamed onto `out_dir` only when complete (an existing report there is replaced)."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            write_json_atomic(tmp / "report.json", self.summary, strict=True)
            self.per_latent.to_csv(tmp / "per_latent.csv", index=False)
            self.pairs.to_csv(tmp / "pairs.csv", index=False)
            if plots:
                self._plot(tmp)
            os.chmod(tmp, 0o755)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _plot(self, folder: Path) -> None:
        """Figure 1 (first pair: cosine scatter + histogram) and, for 3+ SAEs, Figure 2 (k-seed curve)."""
        import matplotlib.pyplot as plt

        from . import plotting

        plotting.use_style()
        res = self.matchings[(0, 1)]
        mean_cos = 0.5 * (res.dec_cos.astype(np.float64) + res.enc_cos)
        agree = res.dec_partner == res.enc_partner
        threshold = self.summary["threshold"]
        fig, (ax, ax_hist) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
        plotting.cosine_scatter_kde(ax, res.dec_cos, res.enc_cos, agree, threshold)
        masks = shared_masks(res, threshold)
        ax.set_title(f"{self.names[0]} vs {self.names[1]}: {res.n_latents} latents, "
                     f"{masks['threshold'].mean():.0%} shared (threshold)", fontsize=9)
        bins = np.linspace(min(0.0, float(mean_cos.min())), 1, 51)
        for value, label in ((True, "same partner"), (False, "different partners")):
            sel = mean_cos[agree == value]
            if sel.size:
                ax_hist.hist(sel, bins=bins, alpha=0.7, color=plotting.AGREE_COLOURS[value],
                             label=f"{label} (mean {sel.mean():.2f})")
        ax_hist.axvline(threshold, color="grey", ls="--", lw=0.8)
        ax_hist.set_xlabel("mean of decoder and encoder cosine")
        ax_hist.set_ylabel("latents")
        ax_hist.legend(fontsize=8)
        fig.tight_layout()
        _save_fig(fig, folder / "fig1_cosines")
        plt.close(fig)
        ks = self.summary.get("kseed")
        if ks:
            curve = ks["curves"][ks["definition"]]
            k_values = sorted(int(k) for k in curve)
            fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(12, 4.5))
            plotting.kseed_panels(ax_lin, ax_log, k_values, [curve[str(k)] for k in k_values],
                                  ks["fits"].get(ks["definition"]) or {})
            ax_lin.set_title(f"'{ks['definition']}' definition, {len(self.names)} SAEs", fontsize=9)
            fig.tight_layout()
            _save_fig(fig, folder / "fig2_kseed")
            plt.close(fig)


def _save_fig(fig: Any, stem: Path) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"), format=ext, bbox_inches="tight")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _nan_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# the computation
# ----------------------------------------------------------------------------------------------


def _validate_family(loaded: Sequence[LoadedSAE]) -> None:
    """Same d_in and same number of latents for all, checked before any work (names both)."""
    first = loaded[0]
    for other in loaded[1:]:
        if other.directions.d_in != first.directions.d_in:
            raise ValueError(f"SAEs have different input widths: {first.name!r} has d_in {first.directions.d_in}, "
                             f"{other.name!r} has d_in {other.directions.d_in}; only SAEs trained on the same "
                             f"activations (same model and hookpoint) can be compared")
        if other.directions.n_latents != first.directions.n_latents:
            raise ValueError(f"SAEs have different numbers of latents: {first.name!r} has {first.directions.n_latents}, "
                             f"{other.name!r} has {other.directions.n_latents}; the Hungarian matching pairs SAEs "
                             f"of the same size")


def compare_saes(saes: Sequence[Any], *, names: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD,
                 definition: str = "threshold", n_boot: int = 1000, seed: int = 0, eps: float = 0.05,
                 activations: Path | str | np.ndarray | None = None, hook: str | None = None,
                 split: str = "heldout", max_tokens: int | None = None, cache: bool = False,
                 cache_dir: Path | str | None = None, method: str = "auto", out_dir: Path | str | None = None,
                 plots: bool = True, progress: bool | Callable[[str], None] = False) -> Report:
    """Measure how many latents two or more SAEs share (the paper's question, for any checkpoints).

    `saes`: paths (any of the three layouts), `.../seed*` globs, Hub ids, or SAE objects (ours,
    sparsify, SAELens, dictionary_learning) or `LatentDirections`. `definition` selects the one used
    for reappearance probability, labels and the k-seed curve (all three are always reported).
    `activations` (array, file or activation cache) adds FVU, L0 and firing frequency per SAE.
    With `out_dir` the report is also written there (atomically). `progress`: True prints to stdout.
    """
    from .analysis import stability, stats
    from .sae.architectures import firing_counts
    from .sae.training import evaluate_sae
    from .studies import per_latent

    log: Callable[[str], None] = (print if progress is True else progress) if progress else (lambda _msg: None)
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown definition {definition!r}; choose one of {DEFINITIONS}")
    items = expand_inputs(list(saes))
    if len(items) < 2:
        raise ValueError(f"need at least two SAEs (seeds) to compare; got {len(items)}"
                         + (f": {items[0]}" if items else "") + " -- pass two or more checkpoints, or a .../seed* glob")
    names = list(names) if names is not None else default_names(items)
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} SAEs")
    t0 = time.perf_counter()
    loaded = []
    for i, (item, name) in enumerate(zip(items, names)):
        log(f"[{i + 1}/{len(items)}] loading {name}")
        loaded.append(load_input(item, name))
    _validate_family(loaded)
    acts = None
    if activations is not None:
        acts = load_activations(activations, hook, split) if not isinstance(activations, np.ndarray) else activations
        if acts.ndim != 2:
            raise ValueError(f"activations must be 2-D [n_tokens, d_in]; got shape {acts.shape}")
        for item in loaded:
            if item.directions.d_in != acts.shape[1]:
                raise ValueError(f"SAE {item.name!r} has input width (d_in) {item.directions.d_in}, but the "
                                 f"activations {activations if not isinstance(activations, np.ndarray) else ''} "
                                 f"have width {acts.shape[1]}; pass activations of the SAE's own model and hookpoint")
            if item.sae is None:
                raise ValueError(f"SAE {item.name!r} could only be read as directions ({item.layout}); "
                                 f"FVU and firing frequencies need the whole SAE")
        if max_tokens is not None:
            acts = acts[:max_tokens]
    dirs = [x.directions for x in loaded]
    n, d_in, n_sae = dirs[0].n_latents, dirs[0].d_in, len(dirs)
    pairs = list(itertools.combinations(range(n_sae), 2))
    results: dict[tuple[int, int], MatchResult] = {}
    for p, (i, j) in enumerate(pairs):
        start = time.perf_counter()
        results[(i, j)] = match(dirs[i], dirs[j], cache=cache, method=method, cache_dir=cache_dir)
        log(f"matched {names[i]} vs {names[j]} ({p + 1}/{len(pairs)}, {n} latents): "
            f"{time.perf_counter() - start:.1f} s")
    fm = stability.FamilyMatching.from_results(n_sae, results)
    fm.seeds = dirs

    # shared fractions: every pair with its first SAE as base, pooled
    pair_masks = [shared_masks(results[p], threshold) for p in pairs]
    fractions = {d: stats.bootstrap_ci(np.concatenate([m[d] for m in pair_masks]), n_boot=n_boot, seed=seed)
                 for d in DEFINITIONS}
    log("chance baseline (random directions) and untrained baseline")
    chance = stability.chance_shared_fractions(dirs[0], threshold, seed=seed, method=method)
    arch = loaded[0].sae.architecture if loaded[0].sae is not None else "topk"
    # every architecture here shares sparsify's tied initialisation, so the shape alone fixes the floor
    untrained = stability.untrained_pw_mcc(arch, d_in, n, 1, seeds=(0, 1), n_boot=200, cache=cache,
                                           cache_dir=cache_dir)["estimate"]
    pw_mcc = fm.pw_mcc(n_boot=n_boot, seed=seed)
    mean_cos = [0.5 * (results[p].dec_cos.astype(np.float64) + results[p].enc_cos) for p in pairs]
    agree = [results[p].dec_partner == results[p].enc_partner for p in pairs]
    all_cos, all_agree = np.concatenate(mean_cos), np.concatenate(agree)
    pair_rows = []
    for p, masks, cos, ag in zip(pairs, pair_masks, mean_cos, agree):
        r = results[p]
        pair_rows.append({"base": names[p[0]], "other": names[p[1]],
                          **{f"shared_{d}": float(masks[d].mean()) for d in DEFINITIONS},
                          "pw_mcc": float(r.dec_cos.mean()), "mean_enc_cos": float(r.enc_cos.mean()),
                          "agreement": agreement_fraction(r),
                          "mean_cos_agree": float(cos[ag].mean()) if ag.any() else float("nan"),
                          "mean_cos_disagree": float(cos[~ag].mean()) if (~ag).any() else float("nan")})
    pairs_df = pd.DataFrame(pair_rows)

    # per-latent: partners and cosines in every other SAE, reappearance probability, label
    counts = fm.shared_counts(definition, threshold)                     # [N, n]
    prob = counts / (n_sae - 1)
    labels = per_latent.stability_classes(prob, eps)
    blocks = []
    for i in range(n_sae):
        block: dict[str, Any] = {"sae": names[i], "latent": np.arange(n)}
        for j in range(n_sae):
            if j == i:
                continue
            r = fm.result(i, j)
            block[f"dec_partner[{names[j]}]"] = r.dec_partner
            block[f"dec_cos[{names[j]}]"] = r.dec_cos
            block[f"enc_partner[{names[j]}]"] = r.enc_partner
            block[f"enc_cos[{names[j]}]"] = r.enc_cos
            block[f"shared[{names[j]}]"] = shared_masks(r, threshold)[definition]
        block.update({"shared_with": counts[i], "reappearance_probability": prob[i], "label": labels[i]})
        blocks.append(pd.DataFrame(block))
    per_latent_df = pd.concat(blocks, ignore_index=True)
    ordered = ["sae", "latent"] + [f"{col}[{nm}]" for nm in names
                                   for col in ("dec_partner", "dec_cos", "enc_partner", "enc_cos", "shared")]
    per_latent_df = per_latent_df[ordered + ["shared_with", "reappearance_probability", "label"]]
    for col in per_latent_df.columns:                                   # self columns are empty
        if col.startswith(("dec_partner[", "enc_partner[")):
            per_latent_df[col] = per_latent_df[col].astype("Int64")
        elif col.startswith("shared["):
            per_latent_df[col] = per_latent_df[col].astype("boolean")

    kseed: dict[str, dict[int, float]] = {}
    kseed_summary = None
    if n_sae >= 3:
        fits = {}
        for d in dict.fromkeys((definition, *REPORT_DEFINITIONS)):
            kseed[d] = fm.kseed_curve(d, threshold)
            fits[d] = (stats.fit_power_law(list(kseed[d]), list(kseed[d].values())) if len(kseed[d]) >= 4
                       else {"ok": False, "reason": f"a fit needs at least 4 points (k = 2..N, N >= 5 SAEs); "
                                                    f"have {len(kseed[d])}"})
        kseed_summary = {"definition": definition, "curves": {d: {str(k): v for k, v in c.items()} for d, c in kseed.items()},
                         "fits": fits}

    per_sae: dict[str, dict[str, Any]] = {x.name: {"source": x.source, "layout": x.layout,
                                                   "architecture": x.directions.meta.get("architecture"),
                                                   "k": x.directions.meta.get("k")} for x in loaded}
    if acts is not None:
        freq_cols = []
        for x in loaded:
            log(f"FVU and firing frequencies of {x.name} on {acts.shape[0]} tokens")
            ev = evaluate_sae(x.sae, acts)
            fired = firing_counts(x.sae, acts, progress=False)
            freq = fired / float(acts.shape[0])
            per_sae[x.name].update({"fvu": ev["fvu"], "l0": ev["l0"], "dead_fraction": float((fired == 0).mean()),
                                    "tokens": int(acts.shape[0]), "median_firing_frequency": float(np.median(freq))})
            freq_cols.append(freq)
        per_latent_df["firing_frequency"] = np.concatenate(freq_cols)

    bimodal = stats.bimodality(all_cos)
    summary = {
        "saes": names, "n_saes": n_sae, "n_latents": n, "d_in": d_in, "threshold": threshold,
        "definition": definition, "pairs": [[names[i], names[j]] for i, j in pairs],
        "shared_fraction": {d: fractions[d] for d in DEFINITIONS},
        "chance_shared_fraction": chance,
        "pw_mcc": {"trained": pw_mcc["estimate"], "ci95_seed": pw_mcc["ci95_seed"],
                   "untrained": untrained, "per_pair": pairs_df["pw_mcc"].tolist(),
                   "untrained_seeds": [0, 1], "untrained_architecture": arch},
        "agree_disagree": {"agreement_fraction": float(all_agree.mean()),
                           "mean_cos_agree": _nan_none(all_cos[all_agree].mean()) if all_agree.any() else None,
                           "mean_cos_disagree": _nan_none(all_cos[~all_agree].mean()) if (~all_agree).any() else None},
        "bimodality": bimodal,
        "kseed": kseed_summary,
        "stability_labels": {"definition": definition, "eps": eps,
                             **{lab: float((labels == lab).mean()) for lab in ("stable", "intermediate", "unstable")}},
        "per_sae": per_sae,
        "method_notes": "each pair (i, j), i listed first, is matched once with SAE i as base; fractions pool "
                        "the base latents of every pair; shared uses strict '>' (SPEC section 2)",
        "seconds": time.perf_counter() - t0,
    }
    report = Report(names, summary, per_latent_df, pairs_df, results, kseed)
    if out_dir is not None:
        log(f"writing report to {out_dir}")
        report.write(out_dir, plots=plots)
    return report


def example_report(family_dir: Path | str, out_dir: Path | str, seeds: Sequence[int] = (0, 1),
                   export_dir: Path | str | None = None, activations: Path | str | None = None,
                   hook: str | None = None, progress: bool | Callable[[str], None] = False) -> Report:
    """The README's example: seeds of a family (`<family_dir>/seed<N>`) exported to the SAELens
    layout (`checkpoints.export_sae`, input scale folded), read back, and compared into `out_dir`.

    The exported folders go to `export_dir` (default: a temporary folder, removed afterwards).
    """
    from .sae.checkpoints import export_sae, seed_dir

    family_dir = Path(family_dir)
    folders = [seed_dir(family_dir, s) for s in seeds]
    missing = [str(f) for f in folders if not f.exists()]
    if missing:
        raise FileNotFoundError(f"no trained checkpoint at {', '.join(missing)} (train the family first)")
    with tempfile.TemporaryDirectory(prefix="sae-seeds-export-") as tmp:
        base = Path(export_dir) if export_dir is not None else Path(tmp)
        exported = [export_sae(f, base / f"seed{s}", layout="saelens") for f, s in zip(folders, seeds)]
        return compare_saes(exported, names=[f"seed{s}" for s in seeds], activations=activations, hook=hook,
                            out_dir=out_dir, progress=progress)
