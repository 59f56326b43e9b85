"""Train SAE families on a cached activation array with the `sparsify` recipe.

The experimental control of the paper: SAEs that differ only in their seed must see the same
batches in the same order. Here the seed drives **only** initialisation (a local
`torch.Generator`, see `architectures.py`); the batch stream is a pure function of `DataConfig`
(`BatchStream`: a numpy `Generator` seeded with `(data_seed, epoch)` permutes the rows of the
activation array, one fresh permutation per epoch). `train_saes` reads each batch once and
steps every SAE of a family on it, and logs a hash per batch so that tests (and readers)
can check that two seeds saw identical data.

Per step (sparsify): FVU loss (+ optional AuxK); remove the decoder-gradient component
parallel to each decoder row; clip the gradient norm to 1.0; Adam with linear warm-up then
linear decay to 0 (`transformers.get_linear_schedule_with_warmup`, whose first step has lr 0);
renormalise decoder rows. `b_dec` is set to the mean of the first batch at step 0.

Files (when `out_dirs` is given), for each SAE's `out_dir`::

    <out_dir>/<hookpoint>/{cfg.json, sae.safetensors, training.json}       final checkpoint
    <out_dir>/tokens_<T>/<hookpoint>/{...}                                  intermediate at T tokens
    <out_dir>/resume_state.pt       model + optimizer + step + trackers (deleted when finished)

Resuming a killed run continues from the last resume state and ends bit-identical to an
uninterrupted run (the batch for step s depends on s alone).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..devices import resolve_device, resolve_dtype, torch_dtype
from ..interrupts import DeferredInterrupts
from ..io import atomic_path, read_json, settings_key
from ..lm.streaming import STATE_FILE as STREAM_STATE_FILE
from .architectures import ARCHITECTURES, UNIT_NORM_DECODER, SAEBase, build_sae, iter_batches
from .checkpoints import TRAINING_INFO, load_sae, save_sae

PAPER_WARMUP_FRACTION = 1000 / 122_070
"""sparsify's 1000 warm-up steps over the paper's 8B tokens at 65,536 tokens per step (~122k steps)."""

SPARSIFY_DEAD_WINDOW = 10_000_000
RESUME_FILE = "resume_state.pt"


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def learning_rate(n_latents: int, lr_scale: float = 1.0, lr: float | None = None) -> float:
    """The learning-rate rule, in one place: `lr` if given, else sparsify's `2e-4 / sqrt(n_latents / 2**14)`
    times `lr_scale` (>1 compensates for runs far shorter than the paper's ~122k steps)."""
    if lr is not None:
        return float(lr)
    return 2e-4 / math.sqrt(n_latents / 2**14) * float(lr_scale)


@dataclass
class TrainConfig:
    """One SAE of a family: architecture, size, seed and optimisation settings.

    lr None -> sparsify's `2e-4 / sqrt(n_latents / 2**14)`. Warm-up is `warmup_steps` if set,
    else `warmup_fraction` of the run (the paper: 1000 of ~122k steps). `l1_coefficient` is the
    sparsity weight of the non-TopK architectures (see `architectures._l1_weighted`; for JumpReLU it
    weighs the L0). `dead_window_tokens` None -> min(10M, a tenth of the run).
    `checkpoint_at_tokens` writes extra checkpoints during the run (training-length ablation).
    `d_in` None -> the activation width. `select_dtype` ("bfloat16") picks the TopK latents from a
    bf16 encoder matmul (sparsify trains under bf16 autocast) while values, loss and gradients stay
    exact in `dtype`; several times faster where bf16 is native, ~50x slower where it is emulated.
    "auto" picks bf16 only where it is native (`devices.resolve_dtype`); None means float32.
    `train_saes` resolves "auto" (and device "auto") before anything is keyed or written.
    """

    architecture: str = "topk"
    n_latents: int = 4096
    k: int | None = 32
    seed: int = 0
    lr: float | None = None
    warmup_fraction: float = PAPER_WARMUP_FRACTION
    warmup_steps: int | None = None
    l1_coefficient: float = 0.2
    auxk_alpha: float = 0.0
    normalize_decoder: bool | None = None
    grad_clip_norm: float | None = 1.0
    dead_window_tokens: int | None = None
    checkpoint_at_tokens: list[int] = field(default_factory=list)
    d_in: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    select_dtype: str | None = None
    name: str = ""

    def resolved_lr(self) -> float:
        return learning_rate(self.n_latents, 1.0, self.lr)

    def resolved_warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return max(1, round(self.warmup_fraction * total_steps))

    def resolved_normalize_decoder(self) -> bool:
        return self.architecture in UNIT_NORM_DECODER if self.normalize_decoder is None else bool(self.normalize_decoder)

    def resolved_dead_window(self, total_tokens: int) -> int:
        if self.dead_window_tokens is not None:
            return int(self.dead_window_tokens)
        return int(min(SPARSIFY_DEAD_WINDOW, max(1, total_tokens // 10)))

    def settings(self) -> dict[str, Any]:
        """What determines the trained weights (device, name, checkpoint list excluded)."""
        out = asdict(self)
        for key in ("device", "name", "checkpoint_at_tokens"):
            out.pop(key)
        out.update(architecture_revision(self.architecture))
        return out


ARCHITECTURE_REVISIONS: dict[str, str] = {
    "jumprelu": "sqrt_d_in",   # bandwidth and initial threshold scaled by sqrt(d_in) (2026-11-29): runs before are not reused
}
"""Changes to an architecture's training made after its keys existed: they enter the run key and the family key."""


def architecture_revision(architecture: str) -> dict[str, str]:
    """`{"revision": ...}` for an architecture changed since its keys existed, else `{}` (other keys stay as they were)."""
    return {"revision": ARCHITECTURE_REVISIONS[architecture]} if architecture in ARCHITECTURE_REVISIONS else {}


@dataclass
class DataConfig:
    """The shared batch stream: a function of these fields alone.

    `n_tokens` None -> one epoch of the array. Training runs `n_tokens // batch_size` steps;
    if that exceeds the array, epochs cycle with a fresh permutation each. `input_scale`
    multiplies every batch (normalises models with huge activation outliers) and is stored
    with the SAE. `hookpoint` names the checkpoint sub-folder; `activations_hash` is the
    caller's identifier of the activation array, recorded in training.json.
    """

    batch_size: int = 4096
    n_tokens: int | None = None
    data_seed: int = 0
    input_scale: float = 1.0
    hookpoint: str = "layer"
    activations_hash: str = ""
    model_dtype: str | None = None   # dtype of the forward pass that made the activations (recorded only)

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model_dtype")  # recorded in training.json; the activations hash already tells caches apart
        return out


@dataclass
class TrainResult:
    """Outcome for one SAE of a family.

    metrics: fvu (held-out when `heldout` was given, else the mean over the last dead window of
    training), fvu_train_window, l0, dead_fraction, tokens, steps, wall_time_s (family loop
    time while this SAE trained, summed over resumes), compute_time_s (its own steps),
    tokens_per_s (tokens / wall_time_s), fvu_source. `finished` is False when the call stopped
    early (`max_steps`). `batch_hashes[s]` identifies the batch of step s (same for every SAE of a
    family and for every seed); `data_stream_hash` hashes them all.
    """

    config: TrainConfig
    data: DataConfig
    sae: SAEBase
    metrics: dict[str, Any]
    finished: bool
    steps: int
    out_dir: Path | None = None
    checkpoint_dir: Path | None = None
    intermediate_dirs: dict[int, Path] = field(default_factory=dict)
    batch_hashes: list[str] = field(default_factory=list)
    data_stream_hash: str = ""
    fvu_history: list[float] = field(default_factory=list)
    dead_mask: np.ndarray | None = None
    settings_key: str = ""


# ----------------------------------------------------------------------------------------------
# data stream
# ----------------------------------------------------------------------------------------------
class BatchStream:
    """Row indices of every batch: a function of (n_rows, batch_size, data_seed) and the step only.

    Token position p of the stream is row `perm_e[p % n_rows]` with `e = p // n_rows` and
    `perm_e = default_rng([data_seed, e]).permutation(n_rows)`; batch s covers positions
    [s*B, (s+1)*B). Indices are returned sorted (memmap locality; the order within a batch
    does not change the loss).
    """

    def __init__(self, n_rows: int, batch_size: int, data_seed: int, cache_epochs: int = 2):
        if n_rows <= 0:
            raise ValueError("empty activation array: no rows to train on")
        self.n_rows, self.batch_size, self.data_seed = int(n_rows), int(batch_size), int(data_seed)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_epochs = cache_epochs

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            perm = np.random.default_rng([self.data_seed, epoch]).permutation(self.n_rows)
            self._cache[epoch] = perm.astype(np.int32 if self.n_rows < 2**31 else np.int64)
            while len(self._cache) > self._cache_epochs:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self.n_rows)
            take = min(stop - pos, self.n_rows - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            pos += take
        return np.sort(np.concatenate(parts).astype(np.int64))


def batch_hash(indices: np.ndarray, raw: np.ndarray) -> str:
    """Identify a batch: sha256 of its row indices and the first 4 KiB of its bytes (16 hex)."""
    digest = hashlib.sha256(np.ascontiguousarray(indices).tobytes())
    digest.update(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)[:4096].tobytes())
    return digest.hexdigest()[:16]


def stream_hash(hashes: Sequence[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


def as_array(activations: Any, what: str) -> np.ndarray:
    """`activations` (numpy or torch) as a 2-D numpy array, or a clear error naming `what` it should be."""
    if isinstance(activations, torch.Tensor):
        activations = activations.detach().cpu().numpy()
    if not isinstance(activations, np.ndarray):
        activations = np.asarray(activations)
    if activations.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n_tokens, d_in]; got shape {activations.shape}")
    if activations.shape[0] == 0:
        raise ValueError(f"empty {what} array: shape {activations.shape}")
    return activations


def _check_finite(raw: np.ndarray, where: str) -> None:
    if not np.isfinite(raw).all():
        bad_rows = np.nonzero(~np.isfinite(raw).all(axis=1))[0]
        raise ValueError(f"NaN/Inf in activation batch {where} ({len(bad_rows)} bad rows of this batch); "
                         f"clean or re-extract the activation array")


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sae(sae: SAEBase, activations: np.ndarray, batch_size: int = 4096,
                 input_scale: float | None = None) -> dict[str, float]:
    """FVU (global mean and variance over all rows), mean L0 and fraction of never-fired latents."""
    acts = as_array(activations, "held-out activations")
    if acts.shape[1] != sae.d_in:
        raise ValueError(f"held-out activation width {acts.shape[1]} != d_in {sae.d_in}")
    device = sae.device
    n = acts.shape[0]
    total = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    sq_err = torch.zeros((), dtype=torch.float64, device=device)
    l0 = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for start, x in iter_batches(sae, acts, batch_size, input_scale=input_scale):
        if not torch.isfinite(x).all():
            _check_finite(np.asarray(acts[start:start + batch_size]), f"at held-out rows {start}..{start + len(x)}")
        out = sae(x)
        sq_err += (out["x_hat"] - x).double().pow(2).sum()
        total += x.double().sum(0)
        total_sq += x.double().pow(2).sum()
        if "indices" in out:   # TopK: in the top-k and > 0
            counts = torch.bincount(out["indices"][out["values"] > 0], minlength=sae.n_latents)
        else:
            counts = (out["latents"] > 0).sum(0)
        fired |= counts > 0
        l0 += float(counts.sum())
    variance = total_sq - total.pow(2).sum() / n
    return {"fvu": float(sq_err / variance), "l0": l0 / n, "never_fired_fraction": float((~fired).float().mean()),
            "tokens": n}


# ----------------------------------------------------------------------------------------------
# one SAE's training state
# ----------------------------------------------------------------------------------------------
def _lr_factor(step: int, warmup: int, total: int) -> float:
    """transformers.get_linear_schedule_with_warmup's multiplier at (0-based) step."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _make_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # pragma: no cover - device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


class _Member:
    """One SAE being trained inside a family."""

    def __init__(self, index: int, cfg: TrainConfig, data: DataConfig, d_in: int, total_steps: int,
                 out_dir: Path | None, key: str):
        self.index, self.cfg, self.data, self.out_dir, self.key = index, cfg, data, out_dir, key
        self.total_steps = total_steps
        self.batch_size = data.batch_size
        self.device = torch.device(cfg.device)
        self.dtype = torch_dtype(cfg.dtype)
        self.select_dtype = torch_dtype(cfg.select_dtype) if cfg.select_dtype else None
        self.sae = build_sae(cfg.architecture, d_in, cfg.n_latents, k=cfg.k, seed=cfg.seed, device=self.device,
                             dtype=self.dtype, normalize_decoder=cfg.resolved_normalize_decoder(),
                             input_scale=data.input_scale)
        self.params = [p for p in self.sae.parameters()]
        self.base_lr = cfg.resolved_lr()
        self.warmup = cfg.resolved_warmup(total_steps)
        self.optimizer = _make_adam(self.params, self.base_lr)
        self.dead_window = cfg.resolved_dead_window(total_steps * data.batch_size)
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.int64, device=self.device)
        self.step = 0
        self.fvu_history: list[float] = []
        self.l0_history: list[float] = []
        self.batch_hashes: list[str] = []
        self.wall_time = 0.0
        self.compute_time = 0.0
        self.intermediate: dict[int, Path] = {}
        self.finished = False
        self.result: TrainResult | None = None

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "settings_key": self.key, "step": self.step, "model": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(), "tokens_since_fired": self.tokens_since_fired,
            "fvu_history": self.fvu_history, "l0_history": self.l0_history, "batch_hashes": self.batch_hashes,
            "wall_time": self.wall_time, "compute_time": self.compute_time,
            "intermediate": {int(t): str(p) for t, p in self.intermediate.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.step = int(state["step"])
        self.fvu_history = list(state["fvu_history"])
        self.l0_history = list(state["l0_history"])
        self.batch_hashes = list(state["batch_hashes"])
        self.wall_time = float(state["wall_time"])
        self.compute_time = float(state["compute_time"])
        self.intermediate = {int(t): Path(p) for t, p in state["intermediate"].items()}

    def save_resume_state(self) -> None:
        if self.out_dir is None or self.finished:
            return
        with atomic_path(self.out_dir / RESUME_FILE) as tmp:
            torch.save(self.state(), tmp)

    # -- training ----------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        seen = self.step * self.batch_size
        return self.tokens_since_fired >= max(1, min(self.dead_window, seen))

    def dead_fraction(self) -> float:
        if self.step == 0:
            return 0.0
        return float(self.dead_mask().float().mean())

    def train_step(self, x: torch.Tensor, total_variance: torch.Tensor, workspace: dict[str, torch.Tensor]) -> None:
        sae, cfg = self.sae, self.cfg
        if self.step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))   # sparsify: centre the pre-activations at init
        lr = self.base_lr * _lr_factor(self.step, self.warmup, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead = (self.tokens_since_fired > self.dead_window) if cfg.auxk_alpha > 0 else None
        stats = sae.loss_and_grads(x, total_variance, l1_coefficient=cfg.l1_coefficient, step=self.step,
                                   total_steps=self.total_steps, dead_mask=dead, auxk_alpha=cfg.auxk_alpha,
                                   workspace=workspace, select_dtype=self.select_dtype)
        fvu = float(stats["fvu"])
        if not math.isfinite(fvu):
            raise FloatingPointError(f"training diverged: FVU is {fvu} at step {self.step} for config #{self.index} "
                                     f"({cfg.architecture}, n_latents={cfg.n_latents}, seed={cfg.seed})")
        if sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm, foreach=True)
        self.optimizer.step()
        if sae.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[stats["fired"]] = 0
        self.fvu_history.append(fvu)
        self.l0_history.append(float(stats["l0"]))
        self.step += 1

    # -- metrics and files -------------------------------------------------------------------
    def window_steps(self) -> int:
        return max(1, min(len(self.fvu_history), self.dead_window // self.batch_size))

    def metrics(self, heldout: np.ndarray | None) -> dict[str, Any]:
        w = self.window_steps()
        tokens = self.step * self.batch_size
        out: dict[str, Any] = {
            "fvu_train_window": float(np.mean(self.fvu_history[-w:])) if self.fvu_history else float("nan"),
            "l0_train_window": float(np.mean(self.l0_history[-w:])) if self.l0_history else float("nan"),
            "dead_fraction": self.dead_fraction(), "dead_window_tokens": self.dead_window,
            "tokens": tokens, "steps": self.step, "wall_time_s": self.wall_time,
            "compute_time_s": self.compute_time,
            "tokens_per_s": tokens / self.wall_time if self.wall_time > 0 else float("nan"),
        }
        if heldout is not None:
            ev = evaluate_sae(self.sae, heldout, batch_size=self.batch_size)
            out.update({"fvu": ev["fvu"], "l0": ev["l0"], "heldout_never_fired_fraction": ev["never_fired_fraction"],
                        "heldout_tokens": ev["tokens"], "fvu_source": "heldout"})
        else:
            out.update({"fvu": out["fvu_train_window"], "l0": out["l0_train_window"], "fvu_source": "train_window"})
        return out

    def training_info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "train_config": asdict(self.cfg), "data_config": asdict(self.data), "seed": self.cfg.seed,
            "data_hash": self.data.activations_hash, "settings_key": self.key, "metrics": metrics,
            "data_stream_sha256": stream_hash(self.batch_hashes), "n_batches": len(self.batch_hashes),
            "lr": self.base_lr, "warmup_steps": self.warmup, "total_steps": self.total_steps,
            "resolved_dtypes": {"model": self.data.model_dtype, "select": self.cfg.select_dtype, "weights": self.cfg.dtype},
            "device": str(self.device),
        }

    def write_checkpoint(self, run_dir: Path, heldout: np.ndarray | None) -> tuple[Path, dict[str, Any]]:
        metrics = self.metrics(heldout)
        folder = save_sae(self.sae, run_dir, self.data.hookpoint, self.training_info(metrics))
        return folder, metrics

    def make_result(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> TrainResult:
        return TrainResult(
            config=self.cfg, data=self.data, sae=self.sae, metrics=metrics, finished=self.finished, steps=self.step,
            out_dir=self.out_dir, checkpoint_dir=checkpoint_dir, intermediate_dirs=dict(self.intermediate),
            batch_hashes=list(self.batch_hashes), data_stream_hash=stream_hash(self.batch_hashes),
            fvu_history=list(self.fvu_history), dead_mask=self.dead_mask().cpu().numpy() if self.step else None,
            settings_key=self.key,
        )


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def is_stream(activations: Any) -> bool:
    """An `lm.streaming.ActivationStream` (or anything with its interface): batches made on the fly."""
    return hasattr(activations, "next_batch") and hasattr(activations, "d_model")


def validate_inputs(activations: Any, configs: Sequence[TrainConfig], data: DataConfig,
                    out_dirs: Sequence[Path] | None) -> tuple[int, int]:
    """Check a family's inputs before any work (clear errors naming the problem); returns (n_rows, d_in).
    `train_saes` and `distributed.train_saes_distributed` both call it, on every rank."""
    if not configs:
        raise ValueError("no TrainConfig given")
    if data.batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {data.batch_size}")
    if is_stream(activations):
        if data.n_tokens is None:
            raise ValueError("a streamed family needs DataConfig.n_tokens: a stream has no end to define an epoch")
        if activations.batch_size != data.batch_size:
            raise ValueError(f"the stream makes batches of {activations.batch_size} tokens, DataConfig.batch_size is "
                             f"{data.batch_size}; build the stream with the family's batch size")
        n_rows, width = None, int(activations.d_model)
    else:
        n_rows, width = activations.shape
    declared = {c.d_in for c in configs if c.d_in is not None}
    if len(declared) > 1:
        raise ValueError(f"mismatched configs in one family: different d_in {sorted(declared)}; "
                         f"every SAE of a family trains on the same activations")
    for i, cfg in enumerate(configs):
        if cfg.d_in is not None and cfg.d_in != width:
            raise ValueError(f"activation width {width} != d_in {cfg.d_in} of config #{i}")
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"config #{i}: unknown architecture {cfg.architecture!r}; expected one of {ARCHITECTURES}")
        if cfg.n_latents <= 0:
            raise ValueError(f"config #{i}: n_latents must be positive; got {cfg.n_latents}")
        if cfg.architecture in ("topk", "batchtopk"):
            if cfg.k is None or cfg.k <= 0:
                raise ValueError(f"config #{i}: a {cfg.architecture} SAE needs k >= 1; got k={cfg.k}")
            if cfg.k > cfg.n_latents:
                raise ValueError(f"config #{i}: k={cfg.k} > n_latents={cfg.n_latents}")
    n_tokens = n_rows if data.n_tokens is None else int(data.n_tokens)
    total_steps = n_tokens // data.batch_size
    if total_steps < 1:
        raise ValueError(f"n_tokens={n_tokens} is smaller than one batch of {data.batch_size} tokens")
    for i, cfg in enumerate(configs):
        late = [t for t in cfg.checkpoint_at_tokens if not 0 < t <= total_steps * data.batch_size]
        if late:
            raise ValueError(f"config #{i}: checkpoint_at_tokens {late} outside the run "
                             f"(1..{total_steps * data.batch_size} tokens)")
    if out_dirs is not None:
        if len(out_dirs) != len(configs):
            raise ValueError(f"{len(out_dirs)} out_dirs for {len(configs)} configs")
        if len({Path(p).resolve() for p in out_dirs}) != len(out_dirs):
            raise ValueError("out_dirs must be distinct (one folder per SAE)")
    return width, total_steps


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with device and `select_dtype` resolved for this machine (`devices`), the weights' dtype checked."""
    device = resolve_device(cfg.device)
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"config {cfg.name or cfg.seed!r}: weights dtype {cfg.dtype!r} is not supported; the SAE's "
                         f"master weights are 'float32' (or 'float64' for tests); lower precision belongs in select_dtype")
    return replace(cfg, device=device, select_dtype=resolve_dtype(cfg.select_dtype, device, "select_dtype"))


def _family_key(cfg: TrainConfig, data: DataConfig, d_in: int) -> str:
    return settings_key({"train": cfg.settings(), "data": data.settings(), "d_in": d_in})


# ----------------------------------------------------------------------------------------------
# the family trainer
# ----------------------------------------------------------------------------------------------
def train_saes(
    activations: np.ndarray | torch.Tensor,
    configs: Sequence[TrainConfig],
    data: DataConfig,
    out_dirs: Sequence[Path | str] | None = None,
    resume: bool = True,
    progress: bool = True,
    *,
    heldout: np.ndarray | None = None,
    max_steps: int | None = None,
    save_every_steps: int | None = None,
    save_every_seconds: float | None = 600.0,
    callback: Callable[[int], None] | None = None,
    init_from: Sequence[Any | None] | None = None,
    batch_source: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[TrainResult]:
    """Train every SAE in `configs` on one shared batch stream (each batch is read once).

    `activations` is an `[N, d_in]` array or memmap, or an `lm.streaming.ActivationStream` (activations made
    by the model on the fly; `data.n_tokens` required; its state is saved beside the resume states, in the
    first SAE's folder, so a killed run continues the stream where it stopped). With `out_dirs` (one folder per config),
    final and intermediate checkpoints are written and a resume state is saved every
    `save_every_steps` steps / `save_every_seconds` seconds and when stopping at `max_steps`
    (this call then returns `finished=False` results). With `resume`, a finished checkpoint whose
    settings match is loaded instead of retrained, and a resume state is continued from;
    a folder holding a different run raises. `heldout` (array) gives the final FVU/L0.
    `callback(step)` runs after every step (monitoring; tests use it to simulate a crash).
    `init_from` (one SAE or None per config) starts from given weights instead of the seeded
    initialisation, for fine-tuning; such runs are not cached, so it needs `out_dirs=None`.
    `batch_source(step)` -> (row ids, rows) replaces the default read of step `step`'s batch (it must return
    exactly that batch; `replication.distributed` passes a sharded read + all-gather over ranks).
    """
    acts = activations if is_stream(activations) else as_array(activations, "activation")
    if heldout is not None:
        heldout = as_array(heldout, "held-out activations")
    configs = [resolve_config(c) for c in configs]
    paths = [Path(p) for p in out_dirs] if out_dirs is not None else None
    d_in, total_steps = validate_inputs(acts, configs, data, paths)
    if heldout is not None and heldout.shape[1] != d_in:
        raise ValueError(f"held-out activation width {heldout.shape[1]} != activation width {d_in}")
    if init_from is not None:
        init_from = list(init_from)
        if len(init_from) != len(configs):
            raise ValueError(f"{len(init_from)} init_from entries for {len(configs)} configs")
        if paths is not None:
            raise ValueError("init_from runs are not cached: pass out_dirs=None")

    members: list[_Member] = []
    results: list[TrainResult | None] = [None] * len(configs)
    for i, cfg in enumerate(configs):
        key = _family_key(cfg, data, d_in)
        out_dir = paths[i] if paths is not None else None
        if out_dir is not None and resume:
            done = _load_finished(out_dir, cfg, data, key)
            if done is not None:
                results[i] = done
                continue
        member = _Member(i, cfg, data, d_in, total_steps, out_dir, key)
        if init_from is not None and init_from[i] is not None:
            member.sae.load_state_dict(copy.deepcopy(init_from[i].state_dict()))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            state_path = out_dir / RESUME_FILE
            if resume and state_path.exists():
                state = torch.load(state_path, map_location=member.device, weights_only=True)
                if state.get("settings_key") != key:
                    raise ValueError(f"{state_path} belongs to a different run (settings differ); "
                                     f"delete it or pick another out_dir")
                member.load_state(state)
        members.append(member)

    if members:
        _run_family(acts, members, data, total_steps, heldout, max_steps, save_every_steps, save_every_seconds,
                    callback, progress, batch_source)
    for member in members:
        results[member.index] = member.result
    return results  # type: ignore[return-value]


def _load_finished(out_dir: Path, cfg: TrainConfig, data: DataConfig, key: str) -> TrainResult | None:
    folder = out_dir / data.hookpoint
    info_path = folder / TRAINING_INFO
    if not info_path.exists():
        return None
    info = read_json(info_path)
    if info.get("settings_key") != key:
        raise ValueError(f"{folder} holds a different finished run (settings differ); delete it, pass resume=False, "
                         f"or pick another out_dir")
    inter = {t: out_dir / f"tokens_{t}" for t in cfg.checkpoint_at_tokens}
    missing = [t for t, d in inter.items() if not (d / data.hookpoint / TRAINING_INFO).exists()]
    if missing:
        # the final weights exist but intermediate checkpoints were asked for later: only a rerun
        # of the same (deterministic) run can produce them
        print(f"{out_dir}: finished run lacks the intermediate checkpoints at {missing} tokens; retraining it")
        return None
    sae = load_sae(folder, device=cfg.device)
    return TrainResult(config=cfg, data=data, sae=sae, metrics=info.get("metrics", {}), finished=True,
                       steps=int(info.get("metrics", {}).get("steps", 0)), out_dir=out_dir, checkpoint_dir=folder,
                       intermediate_dirs=inter, data_stream_hash=info.get("data_stream_sha256", ""), settings_key=key)


def _run_family(acts: np.ndarray, members: list[_Member], data: DataConfig, total_steps: int,
                heldout: np.ndarray | None, max_steps: int | None, save_every_steps: int | None,
                save_every_seconds: float | None, callback: Callable[[int], None] | None, progress: bool,
                batch_source: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> None:

    start = min(m.step for m in members)
    if batch_source is not None:
        batches = batch_source
    elif is_stream(acts):
        batches = _stream_batches(acts, members, start)
    else:
        stream = BatchStream(acts.shape[0], data.batch_size, data.data_seed)

        def batches(s: int) -> tuple[np.ndarray, np.ndarray]:
            idx = stream.indices(s)
            return idx, np.asarray(acts[idx])

    def save_all() -> None:
        for m in members:
            m.save_resume_state()
        if is_stream(acts) and members[0].out_dir is not None:
            acts.save(members[0].out_dir)

    stop = total_steps if max_steps is None else min(total_steps, start + int(max_steps))
    bar = tqdm(total=total_steps, initial=start, desc=f"training {len(members)} SAE(s)", disable=not progress,
               unit="step", dynamic_ncols=True)
    try:
        with DeferredInterrupts() as interrupts:
            _steps(batches, save_all, members, data, start, stop, total_steps, heldout, save_every_steps,
                   save_every_seconds, callback, progress, bar, interrupts)
    except KeyboardInterrupt as stop_signal:
        # Ctrl-C / kernel interrupt / SIGTERM (deferred to the end of a step) or a callback that
        # raised between steps: every SAE is at a step boundary, so its resume state is exact.
        if not getattr(stop_signal, "forced", False):
            save_all()
            if members[0].out_dir is not None and progress:
                print(f"interrupted at step {min(m.step for m in members)}: resume state saved; "
                      f"rerun to continue from there")
        raise
    finally:
        bar.close()

    for m in members:
        if m.step >= total_steps:
            m.finished = True
            if m.out_dir is not None:
                folder, metrics = m.write_checkpoint(m.out_dir, heldout)
                with contextlib.suppress(FileNotFoundError):
                    (m.out_dir / RESUME_FILE).unlink()
                with contextlib.suppress(FileNotFoundError):
                    (m.out_dir / STREAM_STATE_FILE).unlink()   # a streamed family's position
            else:
                folder, metrics = None, m.metrics(heldout)
        else:
            m.save_resume_state()
            folder, metrics = None, m.metrics(heldout)
        m.result = m.make_result(metrics, folder)
    if is_stream(acts) and members[0].out_dir is not None and not members[0].finished:
        acts.save(members[0].out_dir)


def _stream_batches(stream: Any, members: list["_Member"], start: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """The batch function of a streamed family: every SAE must be at the same step, and a resumed run
    continues the stream from the state saved with it."""
    steps = sorted({m.step for m in members})
    if len(steps) > 1:
        raise ValueError(f"the SAEs of a streamed family are at different steps {steps}: a stream is read once, in "
                         f"order, for all of them; train them apart or delete the resume states")
    if start != stream.step:
        folders = [m.out_dir for m in members if m.out_dir is not None]
        if not any(stream.restore(f) and stream.step == start for f in folders):
            raise ValueError(f"the SAEs resume at step {start} but no saved stream state is at that step "
                             f"(looked in {[str(f) for f in folders][:3]}); delete the resume states to start over")
    return stream.next_batch


def _steps(batches: Callable[[int], tuple[np.ndarray, np.ndarray]], save_all: Callable[[], None],
           members: list[_Member], data: DataConfig, start: int, stop: int, total_steps: int,
           heldout: np.ndarray | None, save_every_steps: int | None, save_every_seconds: float | None,
           callback: Callable[[int], None] | None, progress: bool, bar: Any, interrupts: DeferredInterrupts) -> None:
    """The step loop of `_run_family`; returns at `stop`, raises KeyboardInterrupt between steps."""
    B = data.batch_size
    workspaces: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
    last_save = time.perf_counter()
    last_postfix = 0.0
    rate = float("nan")
    for s in range(start, stop):
        t0 = time.perf_counter()
        active = [m for m in members if m.step == s and not m.finished]
        if not active:
            bar.update()
            continue
        idx, raw = batches(s)
        _check_finite(raw, f"at step {s}")
        h = batch_hash(idx, raw)
        host = torch.from_numpy(raw)
        inputs: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for m in active:
            dkey = (m.device, m.dtype)
            if dkey not in inputs:
                x = host.to(device=m.device, dtype=m.dtype)
                if data.input_scale != 1.0:
                    x = x * data.input_scale
                inputs[dkey] = (x, x.var(dim=0, correction=0).sum() * x.shape[0])
            x, tv = inputs[dkey]
            # scratch buffers are shared by the SAEs of a family with the same size (steps run in turn)
            ws = workspaces.setdefault((m.device, m.dtype, m.cfg.n_latents), {})
            t1 = time.perf_counter()
            m.train_step(x, tv, ws)
            m.compute_time += time.perf_counter() - t1
            m.batch_hashes.append(h)
        dt = time.perf_counter() - t0
        for m in active:
            m.wall_time += dt
            tokens = m.step * B
            if m.out_dir is None:
                continue
            for t in sorted(m.cfg.checkpoint_at_tokens):
                if tokens - B < t <= tokens:
                    run_dir = m.out_dir / f"tokens_{t}"
                    m.write_checkpoint(run_dir, heldout)
                    m.intermediate[t] = run_dir
        if callback is not None:
            callback(s)
        rate = B / dt if math.isnan(rate) else 0.9 * rate + 0.1 * B / dt
        now = time.perf_counter()
        if progress and now - last_postfix > 1.0:
            bar.set_postfix(tok_s=f"{rate:,.0f}", fvu=f"{np.mean([m.fvu_history[-1] for m in active]):.4f}",
                            dead=f"{np.mean([m.dead_fraction() for m in active]):.3f}")
            last_postfix = now
        bar.update()
        due_steps = save_every_steps is not None and (s + 1) % save_every_steps == 0
        due_time = save_every_seconds is not None and now - last_save >= save_every_seconds
        if (due_steps or due_time) and s + 1 < total_steps:
            save_all()
            last_save = time.perf_counter()
        interrupts.check()


__all__ = [
    "TrainConfig", "DataConfig", "TrainResult", "BatchStream", "train_saes", "evaluate_sae", "batch_hash",
    "stream_hash", "resolve_config", "PAPER_WARMUP_FRACTION",
]

