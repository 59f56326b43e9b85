"""Train one seed family across several processes (`torch.distributed`), bit-identical to one process.

Launch (one process per GPU, or CPU processes with `gloo` where no GPU is visible)::

    torchrun --nproc_per_node=2 -m replication.distributed --profile smoke

How the work is split (issue #19, item 3):

- **data**: every rank holds the identical full batch at every step. From a disk cache, each rank reads
  its contiguous share of the batch's (sorted) rows and the ranks all-gather them; from a stream
  (`ShardedActivationStream`), each rank runs the model on its share of every chunk of token windows and
  the ranks all-gather the activation rows. Rows travel as raw bytes, so any dtype arrives exactly.
- **seeds**: rank `r` of `W` owns the SAEs with index `i % W == r` and trains only those, with the
  unchanged per-step code of `sae.training.train_saes` (the gathered batch replaces its read through
  `train_saes(batch_source=...)`), so each SAE is bit-identical to a single-process run of the family.
- **files**: only the owning rank writes a seed's folder (checkpoints, intermediate checkpoints, resume
  state); the family's layout is that of a single-process run.
- **lockstep** (`LockstepBatches`): before each read the ranks agree on the step to read (the smallest any
  of them asks for), so ranks whose SAEs resume at different steps, or that own only finished SAEs, keep
  serving their share of the batches the others need, and no collective is ever mismatched.

The cached path feeds each SAE the very bytes a single-process run reads, so its SAEs are bit-identical
to that run's whenever the SAE kernels themselves are (same device kind; checked on CPU, also with 1 vs 2
intra-op threads). The streamed path is too as long as the model's output for a window does not depend on
the other windows of its forward batch (checked on CPU with smollm2-135m in bf16; on GPUs a smaller forward
batch may pick other GEMM kernels: compare before relying on bit-identity across world sizes there).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .lm.activations import hook_rows
from .lm.streaming import ActivationStream
from .sae.training import (
    BatchStream,
    DataConfig,
    TrainConfig,
    TrainResult,
    as_array,
    is_stream,
    resolve_config,
    train_saes,
    validate_inputs,
)

Batch = tuple[np.ndarray, np.ndarray]
# torch >= 2.13 names the one-tensor all-gather `all_gather_single` (`all_gather_into_tensor` warns there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_DONE = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------------
# process group and partitions
# ----------------------------------------------------------------------------------------------
def require_process_group() -> tuple[int, int]:
    """`(rank, world_size)` of the initialised default process group; a clear error when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("the torch.distributed process group is not initialised: call "
                           "torch.distributed.init_process_group first (torchrun sets its environment; "
                           "`torchrun --nproc_per_node=N -m replication.distributed` does both)")
    return dist.get_rank(), dist.get_world_size()


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under `nccl`, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def owned_indices(n_configs: int, rank: int, world_size: int) -> list[int]:
    """The SAEs rank `rank` trains: indices `i` with `i % world_size == rank` (disjoint, complete over ranks)."""
    if world_size > n_configs:
        raise ValueError(f"world_size {world_size} exceeds the number of seeds {n_configs}: ranks "
                         f"{list(range(n_configs, world_size))} would own no SAE; launch at most {n_configs} processes")
    return list(range(rank, n_configs, world_size))


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Rows each rank reads of `total`: contiguous shares of ceil(total / world_size) (the last ones may be short)."""
    chunk = -(-total // world_size)
    return [max(0, min(chunk, total - r * chunk)) for r in range(world_size)]


def shard_slice(total: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of `range(total)` (see `shard_sizes`)."""
    chunk = -(-total // world_size)
    return slice(min(total, rank * chunk), min(total, (rank + 1) * chunk))


def all_gather_rows(part: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Concatenate every rank's `part` (rank r contributes `sizes[r]` rows of the same width and dtype) on
    every rank, in rank order. Rows travel as bytes (padded to the largest share), so the result is exact."""
    rank = dist.get_rank()
    part = np.ascontiguousarray(part)
    if part.ndim != 2 or len(part) != sizes[rank]:
        raise ValueError(f"rank {rank}: expected a [{sizes[rank]}, d] block of rows, got shape {part.shape}")
    width = part.shape[1] * part.dtype.itemsize
    most = max(sizes)
    buf = np.zeros((most, width), np.uint8)
    buf[:len(part)] = part.view(np.uint8).reshape(len(part), width)
    device = comm_device()
    out = torch.empty((len(sizes) * most, width), dtype=torch.uint8, device=device)
    _all_gather_single(out, torch.from_numpy(buf).to(device))
    gathered = out.cpu().numpy().reshape(len(sizes), most, width)
    rows = np.concatenate([gathered[r, :n] for r, n in enumerate(sizes)])
    return np.ascontiguousarray(rows).view(part.dtype).reshape(sum(sizes), part.shape[1])


# ----------------------------------------------------------------------------------------------
# batch sources
# ----------------------------------------------------------------------------------------------
class CachedShardReader:
    """Step `s`'s batch of an activation array (or memmap): every rank reads its share of the rows of
    `BatchStream.indices(s)` and all-gather returns the full batch, equal to `activations[indices]`."""

    def __init__(self, activations: np.ndarray, data: DataConfig):
        self.acts = activations
        self.stream = BatchStream(activations.shape[0], data.batch_size, data.data_seed)

    def __call__(self, step: int) -> Batch:
        rank, world = dist.get_rank(), dist.get_world_size()
        idx = self.stream.indices(step)
        part = np.asarray(self.acts[idx[shard_slice(len(idx), rank, world)]])
        return idx, all_gather_rows(part, shard_sizes(len(idx), world))


class StreamReader:
    """Step `s`'s batch of a `ShardedActivationStream`; a stream behind (a resumed family, or a rank whose
    SAEs are all finished) is restored from a stream state at step `s` saved in any of the family's folders."""

    def __init__(self, stream: Any, folders: Sequence[Path | None]):
        self.stream = stream
        self.folders = [Path(f) for f in folders if f is not None]

    def __call__(self, step: int) -> Batch:
        if self.stream.step != step and not any(self.stream.restore(f) and self.stream.step == step
                                                for f in self.folders):
            raise ValueError(f"the family needs the stream at step {step} but it is at step {self.stream.step} and "
                             f"no saved stream state is at that step (looked in {[str(f) for f in self.folders][:3]}); "
                             f"delete the resume states to start over")
        return self.stream.next_batch(step)


class LockstepBatches:
    """The `batch_source` each rank gives `train_saes`: a call for step `s` first agrees with the other ranks
    on the step to read (the smallest any rank asks for; one all-reduce), reads it together with them
    (`read(step)` is itself collective) and repeats until the agreed step is `s`. A rank thus serves its share
    of the steps the others need before its own; `finish()` keeps serving until every rank is done."""

    def __init__(self, read: Callable[[int], Batch]):
        self.read = read
        self.served = -1
        self.broken = False        # an error inside a collective: the ranks are out of step, stop talking

    def _agree(self, step: int) -> int:
        t = torch.tensor([step], dtype=torch.int64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _serve(self, step: int) -> Batch:
        self.broken = True
        out = self.read(step)
        self.broken = False
        self.served = step
        return out

    def __call__(self, step: int) -> Batch:
        if step <= self.served:
            raise RuntimeError(f"step {step} asked for after step {self.served}: a family's steps are read in order")
        while True:
            self.broken = True
            agreed = self._agree(step)
            self.broken = False
            out = self._serve(agreed)
            if agreed == step:
                return out

    def finish(self) -> None:
        """Serve the other ranks' remaining steps; returns when every rank has called `finish`."""
        while True:
            self.broken = True
            agreed = self._agree(int(_DONE))
            self.broken = False
            if agreed == _DONE:
                return
            self._serve(agreed)


class ShardedActivationStream(ActivationStream):
    """An `lm.streaming.ActivationStream` whose forward passes are split over the ranks: each rank runs the
    model on its contiguous share of every chunk of `batch_seqs` windows and the rows are all-gathered, so
    every rank's stream holds (and hands out) the same rows as one unsplit stream. Every rank must read it
    at the same steps (`train_saes_distributed` does)."""

    @classmethod
    def of(cls, stream: ActivationStream) -> "ShardedActivationStream":
        """The sharded twin of a built stream (same model, windows, settings and position)."""
        twin = cls.__new__(cls)
        twin.__dict__.update(stream.__dict__)
        return twin

    def _produce(self) -> None:
        rank, world = require_process_group()
        n = len(self.windows)
        count = np.arange(self.next_window, self.next_window + self.batch_seqs)
        mine = count[shard_slice(self.batch_seqs, rank, world)]
        if len(mine):
            tokens = torch.from_numpy(self.windows[mine % n]).to(self.device)
            with torch.inference_mode():
                part = hook_rows(self.model, tokens, [self.hook], self.skip, self.store,
                                 where=f"windows {mine[0]}..{mine[-1]}",
                                 remedy="stream with store_dtype='float32'")[self.hook]
        else:
            part = np.empty((0, self.d_model), self.store)
        rows = all_gather_rows(part, [s * self.per_seq for s in shard_sizes(self.batch_seqs, world)])
        ids = (count[:, None] * self.per_seq + np.arange(self.per_seq)[None, :]).reshape(-1)
        self._pending = (np.concatenate([self._pending[0], rows]), np.concatenate([self._pending[1], ids]))
        self.next_window += self.batch_seqs
        self.forward_passes += 1


# ----------------------------------------------------------------------------------------------
# the family trainer
# ----------------------------------------------------------------------------------------------
def train_saes_distributed(
    activations: np.ndarray | torch.Tensor | ShardedActivationStream,
    configs: Sequence[TrainConfig],
    data: DataConfig,
    out_dirs: Sequence[Path | str] | None = None,
    resume: bool = True,
    progress: bool | None = None,
    *,
    heldout: np.ndarray | None = None,
    max_steps: int | None = None,
    save_every_steps: int | None = None,
    save_every_seconds: float | None = 600.0,
    callback: Callable[[int], None] | None = None,
) -> list[TrainResult | None]:
    """`sae.training.train_saes` for the initialised process group: this rank trains (and writes the folders
    of) the SAEs it owns (`owned_indices`) on the full, all-gathered batches; every rank must call it with
    the same arguments. Returns one entry per config: this rank's `TrainResult`s, None for the SAEs of
    other ranks (`family_metrics` collects every SAE's metrics). `progress` None: a bar on rank 0 only.

    A streamed family needs a `ShardedActivationStream` (a plain stream would run every forward on every
    rank). An error on one rank outside a collective lets the others finish their SAEs before it is raised.
    """
    rank, world = require_process_group()
    configs = list(configs)
    mine = owned_indices(len(configs), rank, world)
    paths = [Path(p) for p in out_dirs] if out_dirs is not None else None
    if is_stream(activations):
        if not isinstance(activations, ShardedActivationStream):
            raise TypeError("a streamed family across ranks needs a ShardedActivationStream "
                            "(ShardedActivationStream.of(stream)): a plain stream runs every forward on every rank")
        acts: Any = activations
        read: Callable[[int], Batch] = StreamReader(acts, paths or [])
    else:
        acts = as_array(activations, "activation")
        read = CachedShardReader(acts, data)
    validate_inputs(acts, [resolve_config(c) for c in configs], data, paths)   # the same error on every rank, up front
    batches = LockstepBatches(read)
    try:
        local = train_saes(acts, [configs[i] for i in mine], data,
                           out_dirs=[paths[i] for i in mine] if paths is not None else None, resume=resume,
                           progress=rank == 0 if progress is None else progress, heldout=heldout, max_steps=max_steps,
                           save_every_steps=save_every_steps, save_every_seconds=save_every_seconds,
                           callback=callback, batch_source=batches)
    except BaseException:
        if not batches.broken:
            batches.finish()          # let the other ranks complete their SAEs, then raise here
        raise
    batches.finish()
    results: list[TrainResult | None] = [None] * len(configs)
    for i, result in zip(mine, local):
        results[i] = result
    return results


def family_metrics(results: Sequence[TrainResult | None]) -> list[dict[str, Any]]:
    """Every SAE's metrics (plus `rank`), in config order, on every rank (one all-gather of small objects)."""
    rank, world = require_process_group()
    local = {i: {**r.metrics, "rank": rank} for i, r in enumerate(results) if r is not None}
    gathered: list[dict[int, dict[str, Any]] | None] = [None] * world
    dist.all_gather_object(gathered, local)
    merged: dict[int, dict[str, Any]] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[i] for i in range(len(results))]


# ----------------------------------------------------------------------------------------------
# torchrun entry point
# ----------------------------------------------------------------------------------------------
def init_from_environment() -> tuple[int, int, str]:
    """Initialise the default process group from torchrun's environment: `nccl` and `cuda:<LOCAL_RANK>` where
    CUDA is visible, `gloo` and the CPU otherwise. Returns `(rank, world_size, device)`."""
    from .devices import resolve_device

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no torchrun environment (RANK, WORLD_SIZE): launch with "
                           "`torchrun --nproc_per_node=N -m replication.distributed --profile <profile>`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", resolve_device("auto")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def train_family_distributed(spec: Any, device: str, progress: bool = True) -> list[TrainResult | None]:
    """Train the seeds of `experiments.FamilySpec` `spec` on this rank's `device`, in the family folder of
    `experiments.family_dir(spec)` (where `experiments.seed_family` on that device kind finds them).
    Rank 0 builds the activation cache (the others wait for it); then every rank trains its seeds."""
    from .experiments import check_source, family_data, family_dir, train_configs
    from .lm.activations import build_activation_cache, cache_folder
    from .sae.checkpoints import seed_dir

    rank, _ = require_process_group()
    spec = replace(spec, device=device)
    check_source(spec)
    settings = spec.activation_settings()
    if rank == 0:
        build_activation_cache(settings, device=device, progress=progress)
    else:  # wait on the file, not on a collective (a cache build may outlast the collective timeout)
        manifest = cache_folder(settings.resolved(device)) / "manifest.json"
        while not manifest.exists():
            time.sleep(2.0)
    dist.barrier()
    cache = build_activation_cache(settings, device=device, progress=False)   # reuses the finished cache
    hook = spec.hook
    source, data = family_data(spec, cache)
    if spec.activation_source == "stream":
        source = ShardedActivationStream.of(source)
    root = family_dir(spec)
    return train_saes_distributed(source, train_configs(spec), data, [seed_dir(root, s) for s in spec.seeds],
                                  progress=progress and rank == 0, heldout=cache.heldout(hook))


def main(argv: Sequence[str] | None = None) -> int:
    """`torchrun --nproc_per_node=N -m replication.distributed --profile <p> [--set key=value ...]`."""
    from .experiments import FamilySpec, family_dir

    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m replication.distributed",
                                     description="Train one seed family across torchrun processes (one per GPU).")
    parser.add_argument("--profile", default="default", help="notebooks/params/family/<profile>.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a family setting (YAML value), e.g. --set n_latents=512")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    rank, world, device = init_from_environment()
    try:
        spec = FamilySpec.from_profile(args.profile, **_parse_overrides(args.overrides))
        results = train_family_distributed(spec, device, progress=not args.no_progress)
        metrics = family_metrics(results)
        if rank == 0:
            print(f"{family_dir(replace(spec, device=device))}: {len(metrics)} SAEs trained by {world} ranks "
                  f"(rank 0 on {device})")
            for seed, m in zip(spec.seeds, metrics):
                print(f"  seed {seed} (rank {m['rank']}): fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  "
                      f"dead {m['dead_fraction']:.3f}  tokens {m['tokens']:,}")
    finally:
        dist.destroy_process_group()
    return 0


__all__ = [
    "require_process_group", "owned_indices", "shard_sizes", "shard_slice", "all_gather_rows", "CachedShardReader",
    "StreamReader", "LockstepBatches", "ShardedActivationStream", "train_saes_distributed", "family_metrics",
    "init_from_environment", "train_family_distributed", "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
