"""Cache a model's activations on the corpus as memory-mapped arrays under `data/activations/`.

One forward pass fills every requested hook (several layers and sites at once, stopping
after the deepest layer needed). Arrays are preallocated `.partial` files filled chunk by
chunk; a small progress file, rewritten atomically after each flushed chunk, makes a killed
run resumable (a chunk is recomputed at most once, deterministically, so a resumed cache is
byte-identical to an uninterrupted one). Only when every chunk is done are checksums taken,
files renamed to their final names and the manifest written: a folder with a manifest is
finished, one without it is not.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import paths
from ..devices import resolve_device, resolve_dtype
from ..interrupts import DeferredInterrupts
from ..io import read_json, settings_key, sha256_file, write_json_atomic

SITES = ("mlp_out", "resid_post", "resid_pre", "attn_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def hook_name(layer: int, site: str = "mlp_out") -> str:
    """TransformerLens hook name for a layer and site (`mlp_out`, `resid_post`, ...)."""
    if site not in SITES:
        raise ValueError(f"unknown hook site '{site}'; choose one of {SITES}")
    return f"blocks.{layer}.hook_{site}"


def parse_hook(hook: str) -> tuple[int, str]:
    """Inverse of `hook_name`."""
    match = _HOOK_RE.match(hook)
    if not match or match.group(2) not in SITES:
        raise ValueError(f"unsupported hook '{hook}'; expected 'blocks.<layer>.hook_<site>' with site in {SITES}")
    return int(match.group(1)), match.group(2)


def check_layers(hooks: Sequence[str], n_layers: int, model_name: str) -> None:
    """One-line error when a hook's layer index is outside the model."""
    for hook in hooks:
        layer, _ = parse_hook(hook)
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for {model_name}: it has {n_layers} layers (0-{n_layers - 1})")


@dataclass
class ActivationSettings:
    """Everything that determines the cached arrays; its hash names the cache folder."""

    model_name: str = "smollm2-135m"
    hooks: tuple[str, ...] = ("blocks.15.hook_mlp_out",)
    n_train_tokens: int = 1_000_000
    n_heldout_tokens: int = 100_000
    seq_len: int = 256
    skip_positions: int = 1          # drop the first position(s) of each sequence (attention-sink outliers)
    batch_seqs: int = 16
    model_dtype: str = "auto"        # forward pass; "auto" is resolved by build_activation_cache (devices.py)
    store_dtype: str = "float16"     # dtype on disk
    corpus_sources: tuple[str, ...] | None = None  # None: every default source
    corpus_max_tokens: int | None = None           # None: the whole corpus (>= 10M tokens)
    corpus_seed: int = 0
    random_init: bool = False        # the random-model control
    random_seed: int = 0

    def resolved(self, device: str | torch.device = "cpu") -> "ActivationSettings":
        """These settings with `model_dtype` resolved for `device`: what names the cache folder."""
        return replace(self, model_dtype=resolve_dtype(self.model_dtype, device, "model_dtype"))

    def key(self) -> str:
        if self.model_dtype == "auto":
            raise ValueError("ActivationSettings.key() needs a resolved model_dtype: call .resolved(device) first")
        d = asdict(self)
        d["hooks"] = sorted(d["hooks"])
        return settings_key(d)


@dataclass
class ActivationCache:
    """A finished activation cache: memory-mapped `[n_tokens, d_model]` arrays per hook and split."""

    folder: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path | str, verify: bool = True) -> "ActivationCache":
        """Open a finished cache; with `verify`, recompute checksums and fail loudly on mismatch."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"no finished activation cache at {folder} "
                                    f"(manifest.json missing; rerun the cache build to resume it)")
        manifest = read_json(manifest_path)
        cache = cls(folder, manifest)
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.exists():
                raise FileNotFoundError(f"activation cache file missing: {path}")
            if path.stat().st_size != info["bytes"]:
                raise ValueError(f"activation cache file {path} has {path.stat().st_size} bytes, manifest says "
                                 f"{info['bytes']}: corrupt cache, delete {folder} to rebuild")
            if verify and sha256_file(path) != info["sha256"]:
                raise ValueError(f"activation cache file {path} fails its checksum: corrupt cache, delete {folder} to rebuild")
        return cache

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["settings"]["hooks"])

    @property
    def model_dtype(self) -> str:
        """The (resolved) dtype of the forward pass that produced these activations."""
        return str(self.manifest["settings"]["model_dtype"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def array(self, hook: str, split: str = "train") -> np.memmap:
        """Activations of `hook` on `split` (`train` or `heldout`) as a read-only memmap."""
        if hook not in self.hooks:
            raise KeyError(f"hook '{hook}' not in this cache; cached hooks: {self.hooks}")
        name = _file_name(hook, split)
        info = self.manifest["files"][name]
        return np.memmap(self.folder / name, dtype=np.dtype(self.manifest["store_dtype"]), mode="r", shape=tuple(info["shape"]))

    def train(self, hook: str) -> np.memmap:
        return self.array(hook, "train")

    def heldout(self, hook: str) -> np.memmap:
        return self.array(hook, "heldout")

    def content_hash(self, hook: str, split: str = "train") -> str:
        """Checksum of one array: what SAE checkpoints record as their data hash."""
        return self.manifest["files"][_file_name(hook, split)]["sha256"][:16]

    def input_scale(self, hook: str) -> float:
        """Scalar that brings the mean squared norm to `d_model` (normalises outlier-heavy models)."""
        return float(self.manifest["stats"][hook]["input_scale"])


def _file_name(hook: str, split: str) -> str:
    return f"{split}.{hook}.{'bin'}"


def cache_folder(settings: ActivationSettings) -> Path:
    tag = settings.model_name.replace("/", "_") + ("-random" if settings.random_init else "")
    return paths.ACTIVATIONS_DIR / f"{tag}-{settings.key()}"


def _sequences(tokens: np.ndarray, seq_len: int, n_positions: int, skip: int) -> np.ndarray:
    """Cut the flat token stream into contiguous windows enough for `n_positions` kept tokens."""
    per_seq = seq_len - skip
    n_seq = -(-n_positions // per_seq)
    need = n_seq * seq_len
    if len(tokens) < need:
        raise ValueError(
            f"corpus split has {len(tokens):,} tokens but {need:,} are needed for {n_positions:,} activations "
            f"at seq_len {seq_len}; lower the token budget or enlarge the corpus"
        )
    return np.asarray(tokens[:need], dtype=np.int64).reshape(n_seq, seq_len)


def model_windows(seqs: np.ndarray, bos_token_id: int | None) -> np.ndarray:
    """The windows the model actually sees: for models trained with a BOS token (Gemma) the BOS
    replaces position 0 and the window's tokens shift right by one (its last token drops out, so
    shapes stay the same); `skip_positions=1` then drops the BOS position from the activations."""
    seqs = np.asarray(seqs, np.int64)
    if bos_token_id is None:
        return seqs
    return np.concatenate([np.full((len(seqs), 1), int(bos_token_id), np.int64), seqs[:, :-1]], axis=1)


def split_windows(cache: ActivationCache, split: str = "heldout",
                  n_positions: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A split's windows `[n_seq, seq_len]` exactly as the model sees them, rebuilt from the cache's corpus.

    The corpus named in the manifest is checked against its content hash and cut as
    `build_activation_cache` cuts it, BOS shift included. `n_positions` None: the windows the cache holds
    for that split; -1: every whole window of the split (a streamed family reads them all, cycling).
    """
    from .corpus import Corpus

    settings = cache.manifest["settings"]
    info = cache.manifest["corpus"]
    folder = paths.CORPUS_DIR / info["folder"]
    card_path = folder / "card.json"
    if not card_path.exists():
        raise FileNotFoundError(f"the corpus {folder} that built activation cache {cache.folder.name} is missing; "
                                "rebuild the cache (seed_family) to recreate it")
    corpus = Corpus(folder, read_json(card_path))
    if corpus.content_hash != info["content_hash"]:
        raise ValueError(f"corpus {folder} has content hash {corpus.content_hash}, the activation cache was built "
                         f"from {info['content_hash']}: contexts would not line up with the activations")
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
    seq_len, skip = int(settings["seq_len"]), int(settings["skip_positions"])
    tokens = corpus.tokens(split)
    if n_positions is None:
        n_positions = int(settings["n_train_tokens" if split == "train" else "n_heldout_tokens"])
    elif n_positions == -1:
        n_positions = (len(tokens) // seq_len) * (seq_len - skip)
    windows = _sequences(tokens, seq_len, n_positions, skip)
    bos = None
    if cache.manifest["model"].get("bos_at_position_0"):
        bos = cache.manifest["model"].get("bos_token_id")
        if bos is None:   # manifests written before the id was recorded
            from transformers import AutoTokenizer

            from .models import EMBEDDED_MODELS, convert_embedded

            name = settings["model_name"]
            bos = AutoTokenizer.from_pretrained(str(convert_embedded(name)) if name in EMBEDDED_MODELS else name).bos_token_id
    return model_windows(windows, bos), {"corpus": folder.name, "seq_len": seq_len, "skip_positions": skip,
                                         "bos_at_position_0": bos is not None}


def heldout_token_windows(cache: ActivationCache) -> tuple[np.ndarray, dict[str, Any]]:
    """The held-out windows exactly as the model saw them when the cache was built: activation row r of the
    held-out split is position `skip_positions + r % per_seq` of window `r // per_seq` (`split_windows`)."""
    return split_windows(cache, "heldout")


def hook_rows(model, tokens: torch.Tensor, hooks: Sequence[str], skip: int, store: np.dtype, where: str = "",
              remedy: str = "use store_dtype='float32'") -> dict[str, np.ndarray]:
    """One forward pass (stopped after the last hook's layer): each hook's activations at positions >= `skip`
    as `[rows, d_model]` in `store`, after checking them finite in float32 and in `store` (the activation
    cache and `streaming.ActivationStream` both make their rows here, so they agree bit for bit)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        captured[hook.name] = act[:, skip:, :]

    stop_at = max(parse_hook(h)[0] for h in hooks) + 1
    model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in hooks], stop_at_layer=stop_at)
    out = {}
    for hook in hooks:
        act = captured[hook].reshape(-1, captured[hook].shape[-1]).float()
        if not torch.isfinite(act).all():
            raise FloatingPointError(f"non-finite activations at {hook}, {where}")
        rows = act.cpu().numpy().astype(store)
        if not np.isfinite(rows).all():
            raise OverflowError(f"activations at {hook} reach |x| = {float(act.abs().max()):.3g}, beyond the range of "
                                f"store_dtype {store.name!r}; {remedy}")
        out[hook] = rows
    return out


def build_activation_cache(
    settings: ActivationSettings,
    device: str | torch.device = "cpu",
    model=None,
    progress: bool = True,
    max_chunks: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> ActivationCache:
    """Build (or resume, or reuse) the activation cache for `settings` and return it.

    `model` may be passed to reuse an already-loaded HookedTransformer. `max_chunks` stops
    after that many new chunks (tests use it to simulate a kill); the cache then stays
    unfinished and a later call resumes it. `callback(n_new_chunks)` runs after each saved chunk
    (tests raise KeyboardInterrupt from it). `settings.model_dtype` "auto" is resolved for `device`
    first (`devices.resolve_dtype`), and the resolved dtype names the folder and the manifest.
    """

    from .corpus import DEFAULT_SOURCES, build_corpus
    from .models import load_model

    device = resolve_device(device)
    settings = settings.resolved(device)
    folder = cache_folder(settings)
    if (folder / "manifest.json").exists():
        return ActivationCache.open(folder)
    for hook in settings.hooks:
        parse_hook(hook)
    if model is None:
        from .hub import check_hub_inputs
        from .models import EMBEDDED_MODELS

        check_hub_inputs(settings.model_name, settings.corpus_sources, list(EMBEDDED_MODELS))
        model = load_model(settings.model_name, device=device, dtype=settings.model_dtype,
                           random_init=settings.random_init, random_seed=settings.random_seed)
    check_layers(settings.hooks, model.cfg.n_layers, settings.model_name)
    if settings.seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len {settings.seq_len} exceeds the model context {model.cfg.n_ctx}")
    corpus = build_corpus(
        model.tokenizer, settings.model_name.replace("/", "_"),
        sources=settings.corpus_sources or DEFAULT_SOURCES, max_tokens=settings.corpus_max_tokens,
        seed=settings.corpus_seed, progress=progress,
    )
    d_model = model.cfg.d_model
    store = np.dtype(settings.store_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "settings.json", asdict(settings))
    progress_path = folder / "progress.json"
    state = read_json(progress_path) if progress_path.exists() else {"done": {}}

    skip = settings.skip_positions
    per_seq = settings.seq_len - skip
    plan = {
        "train": (_sequences(corpus.tokens("train"), settings.seq_len, settings.n_train_tokens, skip), settings.n_train_tokens),
        "heldout": (_sequences(corpus.tokens("heldout"), settings.seq_len, settings.n_heldout_tokens, skip),
                    settings.n_heldout_tokens),
    }
    arrays: dict[tuple[str, str], np.memmap] = {}
    for split, (_, n_tok) in plan.items():
        for hook in settings.hooks:
            path = folder / (_file_name(hook, split) + ".partial")
            mode = "r+" if path.exists() else "w+"
            arrays[(hook, split)] = np.memmap(path, dtype=store, mode=mode, shape=(n_tok, d_model))

    total = sum(n for _, n in plan.values())
    done_tokens = sum(min(int(c) * settings.batch_seqs * per_seq, plan[s][1]) for s, c in state["done"].items())
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc=f"caching {settings.model_name} activations",
               disable=not progress)
    # Models trained with a BOS token (Gemma) see it at position 0 of every window (it replaces the
    # window's last token, so shapes stay the same); skip_positions=1 then drops the BOS position.
    bos = model.tokenizer.bos_token_id if model.cfg.default_prepend_bos else None
    new_chunks = 0
    new_tokens = 0
    started = time.time()
    with torch.inference_mode(), DeferredInterrupts() as interrupts:
        for split, (seqs, n_tok) in plan.items():
            n_chunks = -(-len(seqs) // settings.batch_seqs)
            for chunk in range(int(state["done"].get(split, 0)), n_chunks):
                if max_chunks is not None and new_chunks >= max_chunks:
                    bar.close()
                    return None  # type: ignore[return-value]
                rows = seqs[chunk * settings.batch_seqs : (chunk + 1) * settings.batch_seqs]
                batch = torch.from_numpy(model_windows(rows, bos)).to(device)
                lo = chunk * settings.batch_seqs * per_seq
                hi = min(lo + len(batch) * per_seq, n_tok)
                got = hook_rows(model, batch, settings.hooks, skip, store, where=f"{split} chunk {chunk}",
                                remedy="rebuild with store_dtype='float32' (Gemma's residual stream needs it)")
                for hook in settings.hooks:
                    arrays[(hook, split)][lo:hi] = got[hook][: hi - lo]
                for arr in arrays.values():
                    arr.flush()
                state["done"][split] = chunk + 1
                write_json_atomic(progress_path, state)
                new_chunks += 1
                new_tokens += hi - lo
                bar.update(hi - lo)
                if callback is not None:
                    callback(new_chunks)
                try:
                    interrupts.check()  # Ctrl-C / SIGTERM wait for the chunk to be saved (seconds at most)
                except KeyboardInterrupt:
                    bar.close()
                    print(f"interrupted: {sum(state['done'].values())} chunks saved in {progress_path}; "
                          f"rerun to resume")
                    raise
    bar.close()
    elapsed = time.time() - started

    files: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for (hook, split), arr in arrays.items():
        arr.flush()
        del arr
    arrays.clear()
    for split, (_, n_tok) in plan.items():
        for hook in settings.hooks:
            name = _file_name(hook, split)
            os.replace(folder / (name + ".partial"), folder / name)
            files[name] = {"shape": [n_tok, d_model], "bytes": (folder / name).stat().st_size,
                           "sha256": sha256_file(folder / name)}
    for hook in settings.hooks:
        sample = np.memmap(folder / _file_name(hook, "train"), dtype=store, mode="r", shape=(settings.n_train_tokens, d_model))
        head = np.asarray(sample[: min(len(sample), 100_000)], dtype=np.float64)
        sq_norm = float((head**2).sum(1).mean())
        stats[hook] = {
            "mean_norm": float(np.sqrt((head**2).sum(1)).mean()),
            "mean_sq_norm": sq_norm,
            "max_abs": float(np.abs(head).max()),
            "input_scale": float(np.sqrt(d_model / sq_norm)) if sq_norm > 0 else 1.0,
        }
    manifest = {
        "settings": asdict(settings),
        "model": {"name": settings.model_name, "n_layers": model.cfg.n_layers, "d_model": d_model,
                  "bos_at_position_0": bos is not None, "bos_token_id": bos},
        "d_model": d_model,
        "store_dtype": store.name,
        "resolved_dtypes": {"model": settings.model_dtype},
        "device": str(device),
        "corpus": {"folder": corpus.folder.name, "content_hash": corpus.content_hash, "tokens": corpus.card["tokens"]},
        "files": files,
        "stats": stats,
        "build_seconds_last_session": elapsed,
        "build_tokens_last_session": new_tokens,
        "build_tokens_per_s": new_tokens / elapsed if elapsed > 0 else None,   # forward speed at this dtype
    }
    write_json_atomic(folder / "manifest.json", manifest)
    progress_path.unlink(missing_ok=True)
    return ActivationCache(folder, manifest)


def activation_norms(model, tokens: np.ndarray, sites: Sequence[str] = ("mlp_out", "resid_post"), seq_len: int = 256,
                     n_seqs: int = 8, skip_positions: int = 1) -> "pandas.DataFrame":  # noqa: F821
    """Mean and max L2 norm of each layer's activations at each site, on a few windows of text."""

    windows = _sequences(tokens, seq_len, n_seqs * (seq_len - skip_positions), skip_positions)
    device = next(model.parameters()).device
    names = {hook_name(layer, site) for layer in range(model.cfg.n_layers) for site in sites}
    rows = []
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.from_numpy(windows).to(device), names_filter=lambda n: n in names)
    for layer in range(model.cfg.n_layers):
        for site in sites:
            act = cache[hook_name(layer, site)][:, skip_positions:].float()
            norms = act.norm(dim=-1)
            rows.append({"layer": layer, "site": site, "mean_norm": float(norms.mean()),
                         "max_norm": float(norms.max()), "max_abs": float(act.abs().max())})
    return pd.DataFrame(rows)
