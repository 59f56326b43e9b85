"""Pooling: one SAE built from the stable latents of several seeds (issue #7, item 6).

The companion study pools "unique cross-seed features" into one dictionary and reports a more
stable SAE at unchanged explained variance. Here:

1. `stable_components`: latents of the *build* seeds are nodes; a Hungarian match that is
   shared (`threshold` definition) links two nodes. Connected components are cross-seed copies
   of one feature (dedupe by matching). A component is kept when it holds a *stable* latent
   (shared with at least `min_shared` other build seeds).
2. `pooled_sae`: one latent per kept component (its representative: the member shared with
   the most build seeds), largest components first, up to `n_latents`; remaining slots are
   filled with freshly initialised latents (`fill="random"`) or with the base seed's own
   latents that no kept component covers (`fill="base"`).
3. `fine_tune`: the paper's training step (`training`'s sparsify recipe) run briefly from the
   given weights on the family's activations.

Stability of the result is judged against *evaluation* seeds that took no part in the pool.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..analysis.matching import DEFAULT_THRESHOLD, shared_masks
from ..sae.architectures import TopKSAE, build_sae


@dataclass
class Pool:
    """Kept components: `members[c]` = list of (build-seed index, latent); `rep[c]` its representative."""

    members: list[list[tuple[int, int]]]
    rep: list[tuple[int, int]]
    n_seeds_in: np.ndarray          # int [n_components]: distinct build seeds in each component
    n_nodes: int                    # latents considered (all build seeds)

    def __len__(self) -> int:
        return len(self.rep)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def stable_components(fm, build: Sequence[int], min_shared: int, definition: str = "threshold",
                      threshold: float = DEFAULT_THRESHOLD) -> Pool:
    """Union of stable latents across the `build` seeds of a `FamilyMatching`, deduplicated.

    A latent is stable when it is shared with >= `min_shared` of the *other build seeds*.
    """
    build = list(build)
    if len(build) < 2 or len(set(build)) != len(build):
        raise ValueError(f"need at least 2 distinct build seeds; got {build}")
    if not 1 <= min_shared <= len(build) - 1:
        raise ValueError(f"min_shared must be in 1..{len(build) - 1} (other build seeds); got {min_shared}")
    n = fm.n_latents
    parent = np.arange(len(build) * n)
    counts = np.zeros((len(build), n), np.int64)
    for a, b in itertools.permutations(range(len(build)), 2):
        res = fm.result(build[a], build[b])
        mask = shared_masks(res, threshold)[definition]
        counts[a] += mask
        if a < b:
            for l in np.nonzero(mask)[0]:
                # the decoder partner links the pair (equal to the encoder partner under `agree`)
                ra, rb = _find(parent, a * n + int(l)), _find(parent, b * n + int(res.dec_partner[l]))
                if ra != rb:
                    parent[rb] = ra
    roots = np.array([_find(parent, i) for i in range(len(parent))])
    stable = (counts >= min_shared).ravel()
    members, reps, n_in = [], [], []
    for root in np.unique(roots[stable]):
        nodes = np.nonzero(roots == root)[0]
        best = nodes[np.argmax(counts.ravel()[nodes])]          # first (lowest seed) among ties
        members.append([(int(v // n), int(v % n)) for v in nodes])
        reps.append((int(best // n), int(best % n)))
        n_in.append(len({int(v // n) for v in nodes}))
    order = np.argsort(-np.asarray(n_in), kind="stable")
    return Pool([members[i] for i in order], [reps[i] for i in order], np.asarray(n_in)[order], len(parent))


@torch.no_grad()
def pooled_sae(pool: Pool, saes: Sequence[TopKSAE], n_latents: int | None = None, fill: str = "random",
               fill_seed: int = 12345, base: int = 0) -> tuple[TopKSAE, dict[str, Any]]:
    """A TopK SAE whose latents are the pool's representatives (`saes[i]` = build seed i).

    Returns the SAE and a summary: latents taken from the pool, filled, and per source seed.
    """
    if fill not in ("random", "base"):
        raise ValueError(f"fill must be 'random' or 'base'; got {fill!r}")
    ref = saes[0]
    if any(s.architecture != "topk" for s in saes):
        raise ValueError("pooling is implemented for TopK SAEs only")
    if any(s.d_in != ref.d_in or s.k != ref.k for s in saes):
        raise ValueError("every build SAE must have the same d_in and k")
    n_latents = ref.n_latents if n_latents is None else int(n_latents)
    take = min(len(pool), n_latents)
    out = build_sae("topk", ref.d_in, n_latents, k=ref.k, seed=fill_seed, device=ref.device, dtype=ref.dtype,
                    input_scale=ref.input_scale)
    src = [pool.rep[c] for c in range(take)]
    if fill == "base" and take < n_latents:
        covered = {lat for c in range(take) for (s, lat) in pool.members[c] if s == base}
        extra = [(base, l) for l in range(saes[base].n_latents) if l not in covered][: n_latents - take]
        src += extra
    for slot, (s, l) in enumerate(src):
        out.encoder.weight[slot] = saes[s].encoder.weight[l]
        out.encoder.bias[slot] = saes[s].encoder.bias[l]
        out.W_dec[slot] = saes[s].W_dec[l]
    out.b_dec.copy_(torch.stack([s.b_dec for s in saes]).mean(0))
    per_seed = np.bincount([s for s, _ in src[:take]], minlength=len(saes))
    return out, {"pool_size": len(pool), "from_pool": take, "filled": n_latents - take,
                 "filled_from_base": len(src) - take, "per_source_seed": per_seed.tolist(), "fill": fill}


def fine_tune(sae: TopKSAE, activations: np.ndarray, n_tokens: int, *, batch_size: int = 1024, lr: float,
              input_scale: float = 1.0, data_seed: int = 1, select_dtype: str | None = None,
              heldout: np.ndarray | None = None, device: str | torch.device | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Continue training a copy of `sae` for `n_tokens` with the sparsify step (warm-up, linear
    decay, decoder renormalisation). Returns the tuned copy and its metrics (held-out FVU, L0, dead)."""
    from ..sae import training

    if n_tokens < batch_size:
        raise ValueError(f"n_tokens ({n_tokens}) must be at least one batch ({batch_size})")
    dev = str(device if device is not None else sae.device)
    cfg = training.TrainConfig(architecture="topk", n_latents=sae.n_latents, k=sae.k, seed=0, lr=lr,
                               device=dev, select_dtype=select_dtype)
    data = training.DataConfig(batch_size=batch_size, n_tokens=n_tokens, data_seed=data_seed, input_scale=input_scale,
                               hookpoint="pooled")
    (result,) = training.train_saes(activations, [cfg], data, heldout=heldout, progress=False, init_from=[sae])
    return result.sae, result.metrics


def stability_against(sae, others: Sequence, threshold: float = DEFAULT_THRESHOLD,
                      definition: str = "threshold") -> dict[str, Any]:
    """Match `sae` with each SAE in `others` (not cached): shared fraction per other, the fraction of
    latents shared with at least one / with all of them, and Song et al.'s view (PW-MCC against each other:
    the mean Hungarian-matched decoder cosine)."""
    from ..analysis.matching import match

    dirs = sae.latent_directions(name="candidate")
    results = [match(dirs, o.latent_directions(name="other"), cache=False) for o in others]
    masks = np.stack([shared_masks(r, threshold)[definition] for r in results])
    pw = [float(np.mean(r.dec_cos)) for r in results]
    return {"shared_fraction": masks.mean(1).tolist(), "mean_shared_fraction": float(masks.mean()),
            "shared_with_any": float(masks.any(0).mean()), "shared_with_all": float(masks.all(0).mean()),
            "shared_count": masks.sum(0), "pw_mcc_per_other": pw, "pw_mcc": float(np.mean(pw))}


def pooling_experiment(family, n_eval_seeds: int, min_shared: int, fills: Sequence[str] = ("random",),
                       finetune_tokens: int = 1_000_000, threshold: float = DEFAULT_THRESHOLD, lr: float | None = None,
                       data_seed: int = 1, cache: bool = True) -> dict[str, Any]:
    """Pool the first seeds of `family`, fine-tune, and compare with the first seed alone.

    The last `n_eval_seeds` seeds take no part in building and judge stability. Every variant
    (single seed, single seed + the same fine-tuning, pooled per `fills` before/after fine-tuning)
    gets held-out FVU, dead fraction and `stability_against` the evaluation seeds. Fine-tuned
    SAEs are cached under `data/pooling/<key>/` (settings + source SAE hashes).
    """
    from .. import paths
    from ..io import settings_key
    from ..sae import training
    from ..sae.checkpoints import load_sae, save_sae

    n = len(family.spec.seeds)
    if not 1 <= n_eval_seeds <= n - 2:
        raise ValueError(f"n_eval_seeds must leave at least 2 build seeds of {n}; got {n_eval_seeds}")
    build, evaluation = list(range(n - n_eval_seeds)), list(range(n - n_eval_seeds, n))
    pool = stable_components(family.matching, build, min_shared, threshold=threshold)
    saes = [family.results[i].sae for i in build]
    others = [family.results[i].sae for i in evaluation]
    hook = family.spec.hook
    heldout = np.asarray(family.cache.heldout(hook))
    if lr is None:
        lr = training.learning_rate(family.spec.n_latents, family.spec.lr_scale, family.spec.lr)
    tune_kw = dict(batch_size=family.spec.batch_size, lr=lr, input_scale=family.cache.input_scale(hook),
                   data_seed=data_seed, select_dtype=family.spec.select_dtype, heldout=heldout, device=family.spec.device)
    key = settings_key({"sources": [d.content_hash for d in family.directions], "n_eval": n_eval_seeds,
                        "min_shared": min_shared, "threshold": threshold, "tokens": finetune_tokens, "lr": lr,
                        "data_seed": data_seed, "version": 1})
    root = paths.DATA_DIR / "pooling" / f"pool-{key}"

    def tuned(name: str, sae):
        folder = root / name / "pooled"
        if cache and (folder / "training.json").exists():
            return load_sae(folder, device=family.spec.device)
        out, metrics = fine_tune(sae, family.cache.train(hook), finetune_tokens, **tune_kw)
        if cache:
            save_sae(out, root / name, "pooled", {"metrics": metrics, "settings_key": key})
        return out

    def score(sae) -> dict[str, Any]:
        ev = training.evaluate_sae(sae, heldout, batch_size=family.spec.batch_size)
        st = stability_against(sae, others, threshold)
        return {"fvu": ev["fvu"], "dead_fraction": ev["never_fired_fraction"], **st}

    variants: dict[str, dict[str, Any]] = {"single seed": score(saes[0]),
                                           "single seed + fine-tune": score(tuned("single", saes[0]))}
    built: dict[str, Any] = {}
    for fill in fills:
        sae, info = pooled_sae(pool, saes, fill=fill)
        built[fill] = info
        variants[f"pooled ({fill} fill)"] = score(sae)
        variants[f"pooled ({fill} fill) + fine-tune"] = score(tuned(f"pooled-{fill}", sae))
    return {"build_seeds": [family.spec.seeds[i] for i in build], "eval_seeds": [family.spec.seeds[i] for i in evaluation],
            "pool": pool, "pool_size": len(pool), "component_seed_counts": np.bincount(pool.n_seeds_in, minlength=len(build) + 1),
            "built": built, "variants": variants, "lr": lr, "finetune_tokens": finetune_tokens, "cache_dir": str(root)}


__all__ = ["Pool", "stable_components", "pooled_sae", "fine_tune", "stability_against", "pooling_experiment"]
