"""Families handed to an executor (issue #19, item 4): submitit's local executor writes the same checkpoints."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from replication import experiments, paths
from replication.executors import make_executor
from replication.sae.checkpoints import load_sae, seed_folder


def _specs() -> list[experiments.FamilySpec]:
    base = experiments.FamilySpec.from_profile("smoke", n_latents=32, seeds=(0, 1), n_tokens=256 * 10,
                                               checkpoint_at_tokens=())
    return [base, dataclasses.replace(base, k=4)]        # one batch stream: one job trains both


def test_local_executor_writes_the_checkpoints_of_the_in_process_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(paths, "MATCHINGS_DIR", tmp_path / "matchings")
    monkeypatch.setattr(paths, "CHECKPOINTS_DIR", tmp_path / "by_job")
    by_job = experiments.seed_families(_specs(), progress=False, executor=make_executor("local", tmp_path / "logs"))
    assert list((tmp_path / "logs").glob("*_log.out")), "no job ran: submitit wrote no log"
    monkeypatch.setattr(paths, "CHECKPOINTS_DIR", tmp_path / "here")
    here = experiments.seed_families(_specs(), progress=False, executor=None)
    for a, b in zip(by_job, here):
        for seed in a.spec.seeds:
            sa = load_sae(seed_folder(tmp_path / "by_job" / experiments.family_dir(a.spec).name, seed, a.spec.hook))
            sb = load_sae(seed_folder(experiments.family_dir(b.spec), seed, b.spec.hook))
            for key, value in sa.state_dict().items():
                assert torch.equal(value, sb.state_dict()[key]), (a.spec.k, seed, key)


def test_executor_choice_is_checked(monkeypatch) -> None:
    assert make_executor("inline") is None
    with pytest.raises(ValueError, match="unknown executor 'cloud'"):
        make_executor("cloud")
    with pytest.raises(ValueError, match="takes no parameters"):
        make_executor("local", None, slurm_partition="gpu")
    monkeypatch.setenv("REPLICATION_EXECUTOR", "cloud")
    with pytest.raises(ValueError, match="unknown executor"):
        experiments.seed_families(_specs(), progress=False)


def test_local_jobs_share_out_the_cores(tmp_path, monkeypatch) -> None:
    """Concurrent local jobs get this machine's cores divided between them (oversubscribed OpenMP threads made
    small training kernels ~100x slower here); Slurm jobs keep their own cores (None)."""
    from replication.executors import make_executor, threads_per_local_job

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    local = make_executor("local", tmp_path)
    assert [threads_per_local_job(local, n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert threads_per_local_job(None, 4) is None
