"""Functional asymmetry of stable vs unstable latents (companion study, "Unstable features ...").

The SAE's reconstruction, with some latents ablated, replaces the model's activation at the SAE's
hookpoint ("splicing"); we measure the reconstruction error (FVU) on cached held-out activations and
the downstream next-token loss. Ablating a latent = dropping it from the top-k code *after* selection
(the other latents keep their values; nothing is re-selected), so the ablation removes exactly that
latent's contribution.

Unstable latents fire less often, so ablating equally many of them removes less signal by
construction. The study's control (frequency-matched masking): mask enough unstable latents to match
the **activation mass** (summed activation over held-out tokens) of the masked stable ones.

Intervals are paired bootstraps over held-out sequences (tokens within a sequence are correlated) for one
base SAE, and `seed_level_asymmetry` combines several base SAEs (one per seed) with a hierarchical bootstrap:
resample the bases, then the sequences within each, so the interval carries the variance between seeds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..analysis.stats import hierarchical_mean
from ..sae.architectures import SAEBase, iter_codes, on_device


# --------------------------------------------------------------------------- codes and masks
def _check_mask(sae: SAEBase, ablate: np.ndarray | Tensor | None, device: torch.device) -> Tensor | None:
    if ablate is None:
        return None
    m = torch.as_tensor(np.asarray(ablate, bool) if not isinstance(ablate, Tensor) else ablate, device=device)
    if m.dtype != torch.bool or m.shape != (sae.n_latents,):
        raise ValueError(f"ablation mask must be bool [{sae.n_latents}], got {m.dtype} {tuple(m.shape)}")
    return m


@torch.no_grad()
def ablated_reconstruction(sae: SAEBase, x: Tensor, ablate: np.ndarray | Tensor | None = None) -> Tensor:
    """Reconstruction of `x [B, d_in]` (model units) with the latents in `ablate` (bool [n_latents])
    removed from the code after encoding (top-k selection for TopK). Returns float32 in the units of `x`."""
    mask = _check_mask(sae, ablate, sae.device)
    return sae.reconstruct(x, keep=None if mask is None else ~mask)


@torch.no_grad()
def activation_mass(sae: SAEBase, activations: np.ndarray, batch_size: int = 4096,
                    device: str | torch.device | None = None) -> np.ndarray:
    """float64 [n_latents]: summed activation of each latent over the rows of `activations` (model
    units; decoder rows are unit norm, so this is the total norm it contributes)."""
    sae = on_device(sae, device)
    mass = torch.zeros(sae.n_latents, dtype=torch.float64, device=sae.device)
    for _, _, code in iter_codes(sae, activations, batch_size):
        mass += code.totals(sae.n_latents)
    return (mass / sae.input_scale).cpu().numpy()


def mass_matched_mask(mass: np.ndarray, pool: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Random subset of `pool` (bool [n]) whose summed `mass` first reaches `target`: the pool is
    shuffled and the shortest prefix with mass >= target is kept (all of the pool if it cannot)."""
    mass, pool = np.asarray(mass, np.float64), np.asarray(pool, bool)
    if mass.shape != pool.shape:
        raise ValueError(f"mass and pool differ in shape: {mass.shape} vs {pool.shape}")
    if target < 0:
        raise ValueError("target mass must be non-negative")
    idx = rng.permutation(np.flatnonzero(pool))
    cum = np.cumsum(mass[idx])
    n = int(np.searchsorted(cum, target - 1e-9 * max(target, 1.0), side="left")) + 1 if target > 0 else 0
    out = np.zeros(pool.shape, bool)
    out[idx[:min(n, idx.size)]] = True
    return out


def count_matched_mask(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random subset of `pool` with `n` latents (all of it if the pool is smaller)."""
    pool = np.asarray(pool, bool)
    idx = rng.permutation(np.flatnonzero(pool))[:max(int(n), 0)]
    out = np.zeros(pool.shape, bool)
    out[idx] = True
    return out


def ablation_conditions(classes: np.ndarray, mass: np.ndarray, n_draws: int = 3, mass_fraction: float = 1.0,
                        seed: int = 0) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """The study's masks: {"full": no ablation, "stable": stable latents, "unstable_mass": unstable
    latents with the same activation mass, "unstable_count": as many unstable latents as stable ones,
    "random_mass": any latents with the same mass (control)}; each a list of `n_draws` random draws
    (one where the choice is not random). The target mass is `mass_fraction` times the smaller of
    the total stable and total unstable mass, so both sides can reach it. Also returns a summary."""
    classes, mass = np.asarray(classes), np.asarray(mass, np.float64)
    stable, unstable = classes == "stable", classes == "unstable"
    if not stable.any() or not unstable.any():
        raise ValueError(f"need stable and unstable latents, got {int(stable.sum())} stable and {int(unstable.sum())} unstable")
    if not 0 < mass_fraction <= 1:
        raise ValueError("mass_fraction must be in (0, 1]")
    rng = np.random.default_rng(seed)
    m_stable, m_unstable = float(mass[stable].sum()), float(mass[unstable].sum())
    target = mass_fraction * min(m_stable, m_unstable)
    draws = max(int(n_draws), 1)

    def group(pool: np.ndarray) -> list[np.ndarray]:
        if mass[pool].sum() <= target * (1 + 1e-9):
            return [pool.copy()]
        return [mass_matched_mask(mass, pool, target, rng) for _ in range(draws)]

    out: dict[str, list[np.ndarray]] = {"full": [np.zeros_like(stable)], "stable": group(stable),
                                        "unstable_mass": group(unstable)}
    n_stable_masked = int(np.mean([m.sum() for m in out["stable"]]))
    out["unstable_count"] = ([unstable.copy()] if unstable.sum() <= n_stable_masked
                             else [count_matched_mask(unstable, n_stable_masked, rng) for _ in range(draws)])
    out["random_mass"] = [mass_matched_mask(mass, np.ones_like(stable), target, rng) for _ in range(draws)]
    summary = {
        "n_stable": int(stable.sum()), "n_unstable": int(unstable.sum()), "mass_stable": m_stable,
        "mass_unstable": m_unstable, "target_mass": target, "mass_fraction": mass_fraction,
        "masked": {name: {"n_latents": float(np.mean([m.sum() for m in ms])), "mass": float(np.mean([mass[m].sum() for m in ms])),
                          "n_draws": len(ms)} for name, ms in out.items()},
    }
    summary["unstable_per_stable_masked"] = (summary["masked"]["unstable_mass"]["n_latents"]
                                             / max(summary["masked"]["stable"]["n_latents"], 1e-12))
    return out, summary


# --------------------------------------------------------------------------- reconstruction (FVU)
@torch.no_grad()
def reconstruction_errors(sae: SAEBase, activations: np.ndarray, masks: Sequence[np.ndarray | None],
                          group_size: int, batch_size: int = 4096,
                          device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Squared error per condition and held-out group, and the total variance per group.

    Returns (err [n_masks, n_groups], var [n_groups]) with rows of `activations` grouped into
    consecutive blocks of `group_size` (the cache's sequences), so FVU_c = err[c].sum() / var.sum()
    and bootstraps can resample groups. Variance is about the mean over all rows (as in training)."""
    n = int(activations.shape[0]) // group_size * group_size
    if n == 0:
        raise ValueError(f"fewer held-out rows ({activations.shape[0]}) than one group of {group_size}")
    dev = torch.device(device) if device is not None else sae.device
    sae = sae.to(dev)
    mean = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    for start in range(0, n, batch_size):
        mean += torch.as_tensor(np.asarray(activations[start:min(start + batch_size, n)])).to(dev).double().sum(0)
    mean /= n
    tm = [_check_mask(sae, m, dev) for m in masks]
    err = torch.zeros(len(masks), n, dtype=torch.float64, device=dev)
    var = torch.zeros(n, dtype=torch.float64, device=dev)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = torch.as_tensor(np.asarray(activations[start:stop])).to(dev).float()
        var[start:stop] = (x.double() - mean).pow(2).sum(1)
        code = sae.encode_activations(x)
        for c, m in enumerate(tm):
            x_hat = sae.decode(code if m is None else code.masked(~m)).float() / sae.input_scale
            err[c, start:stop] = (x_hat - x).double().pow(2).sum(1)
    return (err.reshape(len(masks), -1, group_size).sum(-1).cpu().numpy(),
            var.reshape(-1, group_size).sum(-1).cpu().numpy())


# --------------------------------------------------------------------------- spliced next-token loss
def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"splicing needs a block hook such as 'blocks.15.hook_mlp_out', got {hook!r}")
    return int(parts[1])


@torch.no_grad()
def spliced_losses(model: Any, sae: SAEBase, hook: str, windows: np.ndarray, masks: Sequence[np.ndarray | None],
                   skip_positions: int = 1, batch_seqs: int = 8, include_clean: bool = True,
                   include_zero: bool = True, progress: bool = False) -> dict[str, np.ndarray]:
    """Mean next-token loss per sequence (float64 [n_seqs]) when the activation at `hook` is replaced by
    the SAE reconstruction with each mask's latents ablated ("mask0", "mask1", ...), plus the clean
    model ("clean") and the activation zeroed ("zero"). The first `skip_positions` positions keep their
    activation (the SAE never saw them: attention-sink outliers were dropped from its training data).

    The residual stream entering the hook's block is computed once per batch; each condition reruns
    only the blocks from there on (`start_at_layer`)."""

    windows = np.asarray(windows, np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_seqs, seq_len >= 2] token ids, got {windows.shape}")
    layer = _hook_layer(hook)
    device = next(model.parameters()).device
    tm = [_check_mask(sae, m, sae.device) for m in masks]
    names = [f"mask{i}" for i in range(len(masks))] + (["clean"] if include_clean else []) + (["zero"] if include_zero else [])
    out = {name: np.zeros(windows.shape[0]) for name in names}

    def replace_with(mask: Tensor | None) -> Callable[[Tensor, Any], Tensor]:
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            tail = act[:, skip_positions:]
            flat = tail.reshape(-1, tail.shape[-1]).to(sae.device)
            recon = ablated_reconstruction(sae, flat, mask).to(act.dtype).to(act.device)
            act = act.clone()
            act[:, skip_positions:] = recon.reshape(tail.shape)
            return act
        return fn

    def zero(act: Tensor, hook: Any = None) -> Tensor:
        act = act.clone()
        act[:, skip_positions:] = 0
        return act

    for start in tqdm(range(0, windows.shape[0], batch_seqs), desc="spliced loss", disable=not progress):
        tokens = torch.from_numpy(windows[start:start + batch_seqs]).to(device)
        resid = model(tokens, stop_at_layer=layer) if layer > 0 else None
        for name in names:
            fn = zero if name == "zero" else (None if name == "clean" else replace_with(tm[int(name[4:])]))
            hooks = [] if fn is None else [(hook, fn)]
            with model.hooks(fwd_hooks=hooks):
                if resid is None:
                    loss = model(tokens, return_type="loss", loss_per_token=True)
                else:
                    loss = model(resid, start_at_layer=layer, tokens=tokens, return_type="loss", loss_per_token=True)
            out[name][start:start + tokens.shape[0]] = loss.double().mean(1).cpu().numpy()
    return out


# --------------------------------------------------------------------------- intervals
def _ratio_draws(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`sum(num[c]) / sum(den)` per condition c (`num [C, G]`, `den [G]`) and its bootstrap replicates
    `[n_boot, C]` over groups (one resample of the groups shared by every condition: paired)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if num.ndim != 2 or den.shape != (num.shape[1],):
        raise ValueError(f"num must be [C, G] and den [G]; got {num.shape} and {den.shape}")
    if num.shape[1] < 2:
        raise ValueError("a bootstrap over groups needs at least 2 groups")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.shape[1], size=(n_boot, num.shape[1]))
    counts = np.stack([np.bincount(row, minlength=num.shape[1]) for row in idx]).astype(np.float64)  # [B, G]
    return num.sum(1) / den.sum(), (counts @ num.T) / (counts @ den)[:, None]


def bootstrap_ratio_deltas(num: np.ndarray, den: np.ndarray, reference: int = 0, n_boot: int = 2000,
                           ci: float = 0.95, seed: int = 0) -> list[dict[str, float]]:
    """Paired bootstrap over groups of ``sum(num[c]) / sum(den)`` and of its difference from the
    `reference` condition, for every condition c (`num [C, G]`, `den [G]`). With den = 1 per group
    this is the mean over groups (e.g. next-token loss per sequence)."""
    est, ratio = _ratio_draws(num, den, n_boot, seed)
    a = (1 - ci) / 2
    out = []
    for c in range(est.shape[0]):
        d = ratio[:, c] - ratio[:, reference]
        out.append({"value": float(est[c]), "low": float(np.quantile(ratio[:, c], a)),
                    "high": float(np.quantile(ratio[:, c], 1 - a)),
                    "delta": float(est[c] - est[reference]), "delta_low": float(np.quantile(d, a)),
                    "delta_high": float(np.quantile(d, 1 - a))})
    return out


def group_means(per_mask: np.ndarray, groups: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Average rows of `per_mask [n_masks, ...]` within each named group of mask indices (random draws)."""
    per_mask = np.asarray(per_mask, np.float64)
    return {name: per_mask[list(ix)].mean(0) for name, ix in groups.items()}


# --------------------------------------------------------------------------- the whole study (notebook 10)
@dataclass
class AsymmetryResult:
    """Stable vs unstable ablations of one SAE: FVU and spliced next-token loss per condition."""

    names: list[str]               # the ablation conditions (masks), in order
    mask_info: dict[str, Any]
    fvu: dict[str, dict[str, float]]   # per condition: value, delta vs "full", bootstrap interval
    ce: dict[str, dict[str, float]]    # the same for the spliced loss, plus "clean" and "zero"
    paired: dict[str, dict[str, float]]   # stable - unstable_mass, paired bootstrap ("fvu", "ce")
    loss_recovered: float
    n_eval_seqs: int
    n_eval_tokens: int
    timings_s: dict[str, float]
    # the per-group arrays the intervals come from (kept for `seed_level_asymmetry`, not written to JSON):
    # FVU numerators [C, G] and denominators [G] over held-out groups; losses [C + 2, S] per sequence
    fvu_parts: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    ce_rows: np.ndarray | None = field(default=None, repr=False)

    def table(self):
        """One row per condition (and clean / zero model): latents removed, FVU, CE and their deltas."""

        rows = self.names + ["clean", "zero"]
        masked = self.mask_info["masked"]
        return pd.DataFrame({"latents removed": [masked[n]["n_latents"] if n in masked else None for n in rows],
                             "FVU": [self.fvu[n]["value"] if n in self.fvu else None for n in rows],
                             "ΔFVU": [self.fvu[n]["delta"] if n in self.fvu else None for n in rows],
                             "CE": [self.ce[n]["value"] for n in rows],
                             "ΔCE vs full": [self.ce[n]["delta"] for n in rows],
                             "ΔCE low": [self.ce[n]["delta_low"] for n in rows],
                             "ΔCE high": [self.ce[n]["delta_high"] for n in rows]}, index=rows)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the figure JSON."""
        def ratio(res: dict[str, dict[str, float]]) -> float:
            d = res["unstable_mass"]["delta"]
            return res["stable"]["delta"] / d if d > 0 else float("inf")

        return {"masks": self.mask_info, "fvu": self.fvu, "ce": self.ce, "loss_recovered": self.loss_recovered,
                "n_eval_seqs": self.n_eval_seqs, "n_eval_tokens": self.n_eval_tokens,
                "stable_over_unstable_mass": {"fvu": ratio(self.fvu), "ce": ratio(self.ce)},
                "stable_minus_unstable_mass_paired": self.paired, "timings_s": self.timings_s}


def functional_asymmetry(model: Any, sae: SAEBase, classes: np.ndarray, heldout: np.ndarray, windows: np.ndarray, hook: str,
                         seq_len: int, skip_positions: int, *, n_draws: int = 2, mass_fraction: float = 1.0, mask_seed: int = 0,
                         batch_seqs: int = 8, n_boot: int = 2000, device: str | torch.device | None = None) -> AsymmetryResult:
    """Ablate stable, mass-matched unstable, count-matched unstable and random latents of `sae` (per
    `classes` from `per_latent.stability_classes`), and measure held-out FVU and the spliced next-token
    loss on `windows`, each with a bootstrap over held-out sequences (the study's design)."""
    mass = activation_mass(sae, heldout, device=device)
    conditions, mask_info = ablation_conditions(classes, mass, n_draws, mass_fraction, seed=mask_seed)
    names = list(conditions)
    masks = [m for name in names for m in conditions[name]]
    groups, i = {}, 0
    for name in names:
        groups[name], i = list(range(i, i + len(conditions[name]))), i + len(conditions[name])
    start = time.time()
    err, var = reconstruction_errors(sae, heldout, masks, group_size=seq_len - skip_positions, device=device)
    err_by_condition = np.stack(list(group_means(err, groups).values()))
    fvu = dict(zip(names, bootstrap_ratio_deltas(err_by_condition, var, reference=0, n_boot=n_boot, seed=1)))
    t_fvu = time.time() - start
    start = time.time()
    losses = spliced_losses(model, sae, hook, windows, masks, skip_positions=skip_positions, batch_seqs=batch_seqs)
    per_cond = group_means(np.stack([losses[f"mask{j}"] for j in range(len(masks))]), groups)
    rows = np.stack([per_cond[n] for n in names] + [losses["clean"], losses["zero"]])
    ce = dict(zip(names + ["clean", "zero"],
                  bootstrap_ratio_deltas(rows, np.ones(rows.shape[1]), reference=0, n_boot=n_boot, seed=2)))
    t_loss = time.time() - start
    stable, unstable = names.index("stable"), names.index("unstable_mass")
    paired = {"fvu": bootstrap_ratio_deltas(err_by_condition, var, reference=unstable, n_boot=n_boot, seed=3)[stable],
              "ce": bootstrap_ratio_deltas(rows, np.ones(rows.shape[1]), reference=unstable, n_boot=n_boot, seed=3)[stable]}
    recovered = (ce["zero"]["value"] - ce["full"]["value"]) / (ce["zero"]["value"] - ce["clean"]["value"])
    return AsymmetryResult(names, mask_info, fvu, ce, paired, recovered, int(windows.shape[0]), int(windows.size),
                           {"fvu": t_fvu, "spliced_loss": t_loss}, (err_by_condition, var), rows)


def seed_level_asymmetry(results: Sequence[AsymmetryResult], n_boot: int = 2000, ci: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
    """Combine `functional_asymmetry` of several base SAEs (one per seed, each with its own stability
    classes and masks) into seed-level numbers: for FVU and the spliced loss, each condition's delta vs
    `full` and the paired `stable - unstable_mass` difference, averaged over the bases, with
    `hierarchical_mean`'s interval (bases, then held-out groups within each). Verdicts read these."""
    if not results:
        raise ValueError("seed_level_asymmetry needs at least one result")
    names = results[0].names
    if any(r.names != names for r in results) or any(r.fvu_parts is None or r.ce_rows is None for r in results):
        raise ValueError("every result must come from functional_asymmetry with the same conditions")
    stable, unstable = names.index("stable"), names.index("unstable_mass")
    out: dict[str, Any] = {"n_bases": len(results), "n_boot": n_boot}
    for metric in ("fvu", "ce"):
        est, draws = [], []
        for b, r in enumerate(results):
            num, den = r.fvu_parts if metric == "fvu" else (r.ce_rows, np.ones(r.ce_rows.shape[1]))
            e, d = _ratio_draws(num, den, n_boot, seed=seed + 7919 * b + (0 if metric == "fvu" else 1))
            est.append(e), draws.append(d)
        est_a, draws_a = np.stack(est), np.stack(draws)                      # [bases, C'], [bases, B, C']
        conditions = names if metric == "fvu" else names + ["clean", "zero"]
        out[metric] = {c: hierarchical_mean(est_a[:, i] - est_a[:, 0], draws_a[:, :, i] - draws_a[:, :, 0], ci, seed)
                       for i, c in enumerate(conditions) if c != "full"}
        out[metric]["stable_minus_unstable_mass"] = hierarchical_mean(
            est_a[:, stable] - est_a[:, unstable], draws_a[:, :, stable] - draws_a[:, :, unstable], ci, seed)
    return out

