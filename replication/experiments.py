"""End-to-end experiments the figure notebooks call: a family of SAEs that differ only in seed.

`seed_family(spec)` builds (or reuses) the activation cache, trains every seed in one pass over
it (or loads the finished checkpoints), measures each SAE's firing counts on the held-out split,
and matches all seed pairs. Every stage is cached under `data/` by its settings, so the figure
notebooks that share a family (Figures 1, 2, 3, A1, A2, A3) pay for it once.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from . import paths
from .devices import resolve_device, resolved_dtypes
from .io import settings_key
from .lm.activations import ActivationCache, ActivationSettings, build_activation_cache
from .sae.checkpoints import seed_dir
from .sae.directions import LatentDirections


@dataclass
class FamilySpec:
    """Everything that defines a seed family: activations, SAE architecture, training, seeds."""

    # Defaults equal `notebooks/params/family/default.yaml` (tests/test_experiments.py fails if they drift);
    # notebooks never rely on them: they call `FamilySpec.from_profile(profile)`.
    # activations
    model_name: str = "smollm2-135m"
    hook: str = "blocks.15.hook_mlp_out"
    n_train_tokens: int = 1_000_000
    n_heldout_tokens: int = 100_000
    seq_len: int = 256
    model_dtype: str = "auto"             # forward pass: "auto" = bf16 only where native (devices.py), or forced
    corpus_sources: tuple[str, ...] | None = None
    corpus_max_tokens: int | None = None
    random_model: bool = False           # train on the random-initialised control model
    store_dtype: str = "float16"         # activations on disk; "float32" for models with huge outliers (Gemma)
    # SAE and training
    architecture: str = "topk"
    n_latents: int = 1024
    k: int | None = 32
    l1_coefficient: float = 0.2
    seeds: tuple[int, ...] = tuple(range(9))
    batch_size: int = 1024
    n_tokens: int | None = 2_000_000     # training budget; None = one epoch of the cached tokens
    data_seed: int = 0
    lr: float | None = None              # None: `training.learning_rate(n_latents, lr_scale)`
    lr_scale: float = 4.0                # >1 compensates for runs far shorter than the paper's ~122k steps
    select_dtype: str | None = "auto"    # top-k chosen in this dtype (as sparsify's autocast); "auto" as model_dtype
    device: str = "cpu"                  # "cpu", "cuda[:N]" or "auto" (cuda where visible)
    extra_hooks: tuple[str, ...] = field(default_factory=tuple)  # more hooks cached in the same pass
    checkpoint_at_tokens: tuple[int, ...] = (125_000, 250_000, 500_000, 1_000_000)  # training trajectories
    # "cache": train on the disk cache of n_train_tokens (epochs over it); "stream": the model makes the training
    # activations on the fly from the corpus's whole train split (no cache of them; the held-out split and the
    # n_train_tokens used for the input scale are still cached)
    activation_source: str = "cache"
    stream_buffer_tokens: int = 0        # the stream's shuffle buffer (0: off, batches in corpus order)

    def resolved_device(self) -> str:
        """The device this family computes on (`auto` resolved)."""
        return resolve_device(self.device)

    def resolved_dtypes(self) -> dict[str, str]:
        """`{"model": ..., "select": ...}` with `auto` resolved for this machine and device (cache keys use these)."""
        return resolved_dtypes(self.model_dtype, self.select_dtype, self.resolved_device())

    def activation_settings(self) -> ActivationSettings:
        hooks = tuple(dict.fromkeys((self.hook, *self.extra_hooks)))
        return ActivationSettings(
            model_name=self.model_name, hooks=hooks, n_train_tokens=self.n_train_tokens,
            n_heldout_tokens=self.n_heldout_tokens, seq_len=self.seq_len,
            model_dtype=self.resolved_dtypes()["model"],
            corpus_sources=tuple(self.corpus_sources) if self.corpus_sources else None,
            corpus_max_tokens=self.corpus_max_tokens, random_init=self.random_model,
            store_dtype=self.store_dtype,
        )

    def training_key(self) -> str:
        """Hash of everything that determines the weights except the seed."""
        d = asdict(self)
        for key in ("seeds", "device", "extra_hooks", "checkpoint_at_tokens", "store_dtype"):
            d.pop(key)  # store_dtype is part of the activations key below
        if d["activation_source"] == "cache":      # keys of cached families predate streaming: keep them
            d.pop("activation_source")
            d.pop("stream_buffer_tokens")
        d["model_dtype"] = self.resolved_dtypes()["model"]   # resolved: caches of different dtypes never mix
        d["select_dtype"] = self.resolved_dtypes()["select"]
        d["activations"] = self.activation_settings().key()
        from .sae.training import architecture_revision

        d.update(architecture_revision(self.architecture))
        return settings_key(d)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "FamilySpec":
        """Build from a parameter dict (e.g. a figure JSON's recorded spec), ignoring keys that are not spec fields."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        for key in ("seeds", "corpus_sources", "extra_hooks", "checkpoint_at_tokens"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def from_profile(cls, profile: str = "default", **overrides: Any) -> "FamilySpec":
        """The family of `notebooks/params/family/<profile>.yaml`, the one home of the family settings,
        with `overrides` on top (a notebook passes its papermill overrides, e.g. `-p n_latents 512`)."""

        path = paths.family_params_file(profile)
        if not path.exists():
            raise ValueError(f"unknown profile {profile!r}: no {path}; choose one of {paths.profile_names()}")
        params = yaml.safe_load(path.read_text()) or {}
        for source, keys in ((str(path), params), ("overrides", overrides)):
            unknown = sorted(set(keys) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"{source}: {unknown} are not family settings; "
                                 f"the fields are {sorted(cls.__dataclass_fields__)}")
        return cls.from_params({**params, **overrides})


def family_overrides(namespace: dict[str, Any]) -> dict[str, Any]:
    """The family settings a notebook's namespace sets (papermill `-p n_latents 512` defines `n_latents`).

    Notebooks call `FamilySpec.from_profile(profile, **family_overrides(globals()))` in their first
    cell, where the namespace holds only the parameters cell and papermill's injected values.
    """
    return {k: v for k, v in namespace.items() if k in FamilySpec.__dataclass_fields__}


@dataclass
class SeedFamily:
    """A trained seed family with its held-out firing counts and (lazily) all pairwise matchings."""

    spec: FamilySpec
    cache: ActivationCache
    results: list                       # training.TrainResult per seed
    firing: np.ndarray                  # int64 [n_seeds, n_latents] held-out firing counts
    n_heldout: int
    timings: dict[str, float]

    @property
    def directions(self) -> list[LatentDirections]:
        return [r.sae.latent_directions(name=f"seed{s}") for r, s in zip(self.results, self.spec.seeds)]

    def directions_at(self, tokens: int) -> list[LatentDirections]:
        """Latent directions of every seed at an intermediate checkpoint (`spec.checkpoint_at_tokens`)."""
        from .sae.checkpoints import load_directions

        if tokens not in self.spec.checkpoint_at_tokens:
            raise ValueError(f"no intermediate checkpoint at {tokens} tokens; this family has "
                             f"{list(self.spec.checkpoint_at_tokens)} (set checkpoint_at_tokens before training)")
        return [load_directions(r.intermediate_dirs[tokens] / self.spec.hook, name=f"seed{s}@{tokens}")
                for r, s in zip(self.results, self.spec.seeds)]

    @cached_property
    def matching(self):
        """`stability.FamilyMatching` over every seed pair (cached on disk per pair)."""
        from .analysis.stability import FamilyMatching

        start = time.time()
        fam = FamilyMatching(self.directions)
        self.timings["matching_s"] = time.time() - start
        return fam

    def training_table(self):
        """One row per seed: FVU, L0, dead fraction, tokens, wall time, tokens/s."""

        rows = []
        for seed, res in zip(self.spec.seeds, self.results):
            m = res.metrics
            keys = ("fvu", "l0", "dead_fraction", "tokens", "wall_time_s", "tokens_per_s")
            rows.append({"seed": seed, **{k: m.get(k) for k in keys}})
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for figure JSON: settings, training metrics, timings."""
        table = self.training_table()
        return {
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.spec).items()},
            "resolved_dtypes": self.spec.resolved_dtypes(),
            "resolved_device": self.spec.resolved_device(),
            "d_in": self.cache.d_model,
            "activation_cache": self.cache.folder.name,
            "training": table.to_dict(orient="records"),
            "mean_fvu": float(table.fvu.mean()),
            "mean_l0": float(table.l0.mean()),
            "mean_dead_fraction": float(table.dead_fraction.mean()),
            "heldout_tokens": self.n_heldout,
            "timings_s": dict(self.timings),
        }


def family_dir(spec: FamilySpec) -> Path:
    """Checkpoint folder of a family: `data/saes/<model>-<arch>-<n>-k<k>-<key>/`."""
    model = spec.model_name.replace("/", "_") + ("-random" if spec.random_model else "")
    tag = f"{model}-{spec.architecture}-{spec.n_latents}-k{spec.k}"
    return paths.CHECKPOINTS_DIR / f"{tag}-{spec.training_key()}"


def train_configs(spec: FamilySpec) -> list:
    """One `TrainConfig` per seed of `spec` (dtypes and device resolved): what `seed_families` trains."""
    from .sae.training import TrainConfig, learning_rate

    lr = learning_rate(spec.n_latents, spec.lr_scale, spec.lr)
    return [
        TrainConfig(architecture=spec.architecture, n_latents=spec.n_latents, k=spec.k, seed=seed, lr=lr,
                    l1_coefficient=spec.l1_coefficient, select_dtype=spec.resolved_dtypes()["select"],
                    device=spec.resolved_device(),
                    checkpoint_at_tokens=list(spec.checkpoint_at_tokens))
        for seed in spec.seeds
    ]


def _stream_key(spec: FamilySpec) -> tuple:
    """Families with equal keys read the same batches and can be trained in one pass."""
    return (spec.activation_settings().key(), spec.hook, spec.batch_size, spec.n_tokens, spec.data_seed,
            spec.resolved_device(), spec.activation_source, spec.stream_buffer_tokens)


def check_source(spec: FamilySpec) -> None:
    """Reject an unknown `activation_source`, a stream without a budget, or a buffer smaller than a batch."""
    if spec.activation_source not in ("cache", "stream"):
        raise ValueError(f"activation_source {spec.activation_source!r}: choose 'cache' or 'stream'")
    if spec.activation_source == "stream" and spec.n_tokens is None:
        raise ValueError("a streamed family needs n_tokens (the training budget): a stream has no epoch")
    if spec.stream_buffer_tokens < 0 or (spec.stream_buffer_tokens and spec.stream_buffer_tokens < spec.batch_size):
        raise ValueError(f"stream_buffer_tokens {spec.stream_buffer_tokens} must be 0 (off) or >= batch_size "
                         f"{spec.batch_size}")


def activation_stream(spec: FamilySpec, cache: ActivationCache, model=None):
    """The `lm.streaming.ActivationStream` a streamed family trains on: the corpus's whole train split (the
    corpus of `cache`), the spec's hook, batch size, data seed and shuffle buffer, the cache's forward dtype."""
    from .lm.activations import split_windows
    from .lm.models import load_model
    from .lm.streaming import ActivationStream

    settings = cache.manifest["settings"]
    device = spec.resolved_device()
    if model is None:
        model = load_model(settings["model_name"], device=device, dtype=settings["model_dtype"],
                           random_init=settings["random_init"], random_seed=settings["random_seed"])
    windows, _ = split_windows(cache, "train", n_positions=-1)
    return ActivationStream(model, windows, spec.hook, batch_size=spec.batch_size,
                            skip_positions=int(settings["skip_positions"]), data_seed=spec.data_seed,
                            buffer_tokens=spec.stream_buffer_tokens, batch_seqs=int(settings["batch_seqs"]),
                            store_dtype=spec.store_dtype, device=device)


def family_data(spec: FamilySpec, cache: ActivationCache, model=None) -> tuple[Any, Any]:
    """(training source, DataConfig) of a family: the cached train split, or the activation stream, with the
    hash that names it; `seed_families` and `distributed.train_family_distributed` both train on these."""
    from .sae.training import DataConfig

    hook = spec.hook
    if spec.activation_source == "stream":
        source: Any = activation_stream(spec, cache, model)
        source_hash = f"stream-{source.fingerprint()}"
    else:
        source, source_hash = cache.train(hook), cache.content_hash(hook)
    data = DataConfig(batch_size=spec.batch_size, n_tokens=spec.n_tokens, data_seed=spec.data_seed,
                      input_scale=cache.input_scale(hook), hookpoint=hook, activations_hash=source_hash,
                      model_dtype=cache.model_dtype)
    return source, data


def seed_families(specs: Sequence[FamilySpec], progress: bool = True, model=None, executor: Any = "env") -> list[SeedFamily]:
    """Build every family's activation cache, train (or load) all their SAEs, count held-out firing.

    Families that share a batch stream (same activations, hook, batch size, token budget and data
    seed) are trained together in one pass over the cache: each batch is read once and steps every
    SAE of every such family (sweeps over size, k, architecture or seed cost one read of the data).
    A cache with several hooks is built in one forward pass (list the hooks in `extra_hooks`).

    `executor`: None trains here; a submitit executor (or "local" / "slurm", `executors.make_executor`)
    gets one job per group of families sharing a batch stream, and the finished checkpoints are then loaded
    here; "env" (the default) reads REPLICATION_EXECUTOR (unset: here). Activation caches are built here first.
    """
    from .sae.architectures import firing_counts
    from .sae.training import train_saes

    requested = list(specs)
    for spec in requested:
        check_source(spec)
    # a family listed twice (e.g. where two sweeps cross) trains once
    identity = [(family_dir(s), s.seeds, s.checkpoint_at_tokens, s.extra_hooks) for s in requested]
    unique = dict(zip(identity, requested))
    specs = list(unique.values())
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_stream_key(spec), []).append(i)
    if isinstance(executor, str):
        from .executors import executor_from_env, make_executor

        executor = executor_from_env() if executor == "env" else make_executor(executor)
    if executor is not None:
        _train_elsewhere(executor, specs, list(groups.values()), model, progress)
    families: list[SeedFamily | None] = [None] * len(specs)
    for indices in groups.values():
        first = specs[indices[0]]
        timings: dict[str, float] = {}
        start = time.time()
        device = first.resolved_device()
        cache = build_activation_cache(first.activation_settings(), device=device, model=model, progress=progress)
        timings["activations_s"] = time.time() - start
        hook = first.hook
        source, data = family_data(first, cache, model)
        configs, out_dirs, owner = [], [], []
        for i in indices:
            root = family_dir(specs[i])
            for cfg, seed in zip(train_configs(specs[i]), specs[i].seeds):
                configs.append(cfg)
                out_dirs.append(seed_dir(root, seed))
                owner.append(i)
        start = time.time()
        heldout = cache.heldout(hook)
        results = train_saes(source, configs, data, out_dirs=out_dirs, heldout=heldout, progress=progress)
        timings["training_s"] = time.time() - start
        for i in indices:
            mine = [r for r, o in zip(results, owner) if o == i]
            start = time.time()
            firing = np.stack([firing_counts(r.sae, heldout, device=device, progress=False) for r in mine])
            families[i] = SeedFamily(specs[i], cache, mine, firing, int(heldout.shape[0]),
                                     {**timings, "firing_s": time.time() - start})
    by_identity = dict(zip(unique, families))
    return [by_identity[key] for key in identity]  # type: ignore[misc]


def _train_elsewhere(executor: Any, specs: list[FamilySpec], groups: list[list[int]], model, progress: bool) -> None:
    """Submit one job per group of families (one batch stream each) that has an unfinished seed; wait for all.

    The activation caches are built here first, so that concurrent jobs never build the same cache twice.
    """
    from .executors import current_paths, threads_per_local_job, train_job
    from .sae.checkpoints import is_finished, seed_folder

    pending = []
    for indices in groups:
        group = [specs[i] for i in indices]
        build_activation_cache(group[0].activation_settings(), device=group[0].resolved_device(), model=model,
                               progress=progress)
        if not all(is_finished(seed_folder(family_dir(s), seed, s.hook)) for s in group for seed in s.seeds):
            pending.append(group)
    threads = threads_per_local_job(executor, len(pending))
    jobs = [executor.submit(train_job, group, current_paths(), threads) for group in pending]
    for job in jobs:
        job.result()    # re-raises a job's error here, with its traceback


def seed_family(spec: FamilySpec, progress: bool = True, model=None) -> SeedFamily:
    """Build the activation cache, train (or load) every seed, and count held-out firing."""
    return seed_families([spec], progress=progress, model=model)[0]


def pw_mcc_views(family: SeedFamily, n_boot: int = 1000, n_random_seeds: int = 4, progress: bool = False) -> dict[str, Any]:
    """Song et al.'s PW-MCC of `family` (seed-level interval) with its two floors, for every figure of a family:
    `baselines.untrained` (SAEs of the same shape and seeds at their seeded initialisation) and
    `baselines.random_model` (the same spec trained on the random-initialised model, its first `n_random_seeds`
    seeds, no intermediate checkpoints: trained once, then loaded by every notebook that asks)."""
    from .analysis.stability import untrained_pw_mcc

    spec = family.spec
    if n_random_seeds < 2:
        raise ValueError(f"n_random_seeds must be >= 2 (a PW-MCC needs a pair), got {n_random_seeds}")
    random_spec = replace(spec, random_model=True, seeds=tuple(spec.seeds[:n_random_seeds]), checkpoint_at_tokens=())
    random_family = seed_family(random_spec, progress=progress)
    random_model = {**random_family.matching.pw_mcc(n_boot=n_boot), "fvu": float(random_family.training_table().fvu.mean()),
                    "seeds": list(random_spec.seeds)}
    untrained = untrained_pw_mcc(spec.architecture, family.cache.d_model, spec.n_latents, spec.k, spec.seeds, n_boot=n_boot)
    return {**family.matching.pw_mcc(n_boot=n_boot), "baselines": {"untrained": untrained, "random_model": random_model}}


@dataclass
class FinishedFamily:
    """The final SAEs of a seed family, their activation cache and pairwise matchings (read-only)."""

    spec: FamilySpec
    cache: ActivationCache
    saes: list
    directions: list[LatentDirections]
    matching: Any
    loaded_without_training: bool


def load_finished_family(spec: FamilySpec, train_if_missing: bool = True, progress: bool = False) -> FinishedFamily:
    """A family's final SAEs read from their checkpoints, never retraining a finished seed.

    `seed_family` also (re)trains seeds whose intermediate checkpoints are missing; analyses that
    need only the final weights (Figure 6) read them here, and fall back to `seed_family` only when
    a final checkpoint is absent (`train_if_missing`).
    """
    from .analysis.stability import FamilyMatching
    from .lm.activations import cache_folder
    from .sae.checkpoints import is_finished, load_sae, seed_folder

    folders = [seed_folder(family_dir(spec), s, spec.hook) for s in spec.seeds]
    act_folder = cache_folder(spec.activation_settings())
    if not (all(is_finished(f) for f in folders) and (act_folder / "manifest.json").exists()):
        if not train_if_missing:
            missing = [str(f) for f in folders if not is_finished(f)]
            raise FileNotFoundError(f"family not trained: missing {missing[:3]} (run experiments.seed_family first)")
        fam = seed_family(spec, progress=progress)
        return FinishedFamily(spec, fam.cache, [r.sae for r in fam.results], fam.directions, fam.matching, False)
    saes = [load_sae(f, device=spec.device) for f in folders]
    directions = [sae.latent_directions(name=f"seed{s}") for sae, s in zip(saes, spec.seeds)]
    return FinishedFamily(spec, ActivationCache.open(act_folder), saes, directions,
                          FamilyMatching(directions, progress=progress), True)
