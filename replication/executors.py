"""Where seed families train: in this process (the default), or handed to submitit as jobs (local or Slurm).

The ablation notebooks train dozens of independent families. `experiments.seed_families` groups them by
batch stream (one pass over the data trains a whole group) and, given an executor, submits one job per
group, waits for all of them, then loads the finished checkpoints here. The jobs write the same files
the in-process run writes (a job is `seed_families` itself, in another process), so a notebook reads
the same checkpoints whichever executor trained them (tests/test_executors.py).

Choose it without touching a notebook, from the environment:

    REPLICATION_EXECUTOR=slurm REPLICATION_EXECUTOR_FOLDER=/shared/logs \\
    REPLICATION_SLURM='{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 600}' make figures

(`local`: submitit's local executor, jobs as subprocesses of this machine; unset or `inline`: this process).
`data/` must be on storage the jobs can reach (on a cluster: a shared filesystem).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import paths

KINDS = ("inline", "local", "slurm")


def make_executor(kind: str, folder: Path | str | None = None, **params: Any):
    """A submitit executor: "local" (subprocesses here) or "slurm" (`params` are submitit's, e.g.
    `slurm_partition`, `gpus_per_node`, `timeout_min`); "inline" gives None (train in this process)."""
    if kind not in KINDS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {KINDS}")
    if kind == "inline":
        return None
    try:
        import submitit
    except ImportError as err:   # a pinned dependency; only a broken install lacks it
        raise ImportError("the local and slurm executors need submitit (pip install submitit)") from err
    folder = Path(folder) if folder is not None else paths.DATA_DIR / "executor_logs"
    if kind == "local":
        if params:
            raise ValueError(f"the local executor takes no parameters, got {sorted(params)}")
        return submitit.LocalExecutor(folder=folder)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    if params:
        executor.update_parameters(**params)
    return executor


def executor_from_env():
    """The executor named by REPLICATION_EXECUTOR (None when unset or "inline"), with its log folder from
    REPLICATION_EXECUTOR_FOLDER and Slurm parameters from REPLICATION_SLURM (a JSON object)."""
    kind = os.environ.get("REPLICATION_EXECUTOR", "inline") or "inline"
    params = json.loads(os.environ.get("REPLICATION_SLURM", "{}") or "{}") if kind == "slurm" else {}
    return make_executor(kind, os.environ.get("REPLICATION_EXECUTOR_FOLDER"), **params)


PATH_NAMES = ("DATA_DIR", "MODELS_DIR", "CORPUS_DIR", "ACTIVATIONS_DIR", "CHECKPOINTS_DIR", "MATCHINGS_DIR")


def current_paths() -> dict[str, str]:
    """The data paths of this process, handed to a job so that it writes where its caller reads."""
    return {name: str(getattr(paths, name)) for name in PATH_NAMES}


def threads_per_local_job(executor: Any, n_jobs: int) -> int | None:
    """CPU threads for each of `n_jobs` concurrent jobs of a local executor: this machine's cores shared out
    (None for other executors: a Slurm job has its own cores). Without it, every job starts one thread per core:
    on 2 cores, two jobs of 2 threads made TopK's small sparse kernels ~100x slower (0.3 ms -> ~50 ms)."""
    import submitit

    if not isinstance(executor, submitit.LocalExecutor) or n_jobs < 1:
        return None
    return max(1, (os.cpu_count() or 1) // n_jobs)


def train_job(specs: list, path_values: dict[str, str], threads: int | None = None) -> list[str]:
    """What a job runs: train (or load) one group of families in one pass, with the caller's data paths
    (and `threads` torch threads, when set). Returns the families' checkpoint folders (small: the weights
    stay on disk)."""
    from .experiments import family_dir, seed_families

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    for name, value in path_values.items():
        setattr(paths, name, Path(value))
    seed_families(specs, progress=False, executor=None)
    return [str(family_dir(s)) for s in specs]
