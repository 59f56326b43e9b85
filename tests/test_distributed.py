"""Multi-process family training (issue #19, item 3): 2 gloo ranks equal one process bit for bit."""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from replication.distributed import owned_indices, shard_sizes, train_saes_distributed
from replication.io import sha256_file
from replication.lm.streaming import ActivationStream
from replication.sae.training import DataConfig, TrainConfig, train_saes

D = 16
WORLD = 2
SEEDS = (0, 1, 2)                       # rank 0 owns seeds 0 and 2, rank 1 owns seed 1
ACTS = np.random.default_rng(0).standard_normal((4096, D)).astype(np.float32)
HELDOUT = np.random.default_rng(1).standard_normal((512, D)).astype(np.float32)
DATA = DataConfig(batch_size=256, n_tokens=256 * 8, data_seed=1)             # 8 steps
HOOK = "blocks.1.hook_mlp_out"
WINDOWS = np.random.default_rng(2).integers(0, 5000, size=(40, 9))          # 8 kept rows per window
STREAM_DATA = DataConfig(batch_size=64, n_tokens=64 * 8, data_seed=0, hookpoint=HOOK)
TIMING = ("wall_time_s", "compute_time_s", "tokens_per_s")   # metrics that measure time, not weights


def _configs() -> list[TrainConfig]:
    return [TrainConfig(architecture="topk", n_latents=32, k=4, seed=s, lr=3e-3, checkpoint_at_tokens=[512])
            for s in SEEDS]


class _Cfg:
    d_model = D


class FakeModel:
    """A deterministic stand-in for a HookedTransformer (row-wise, so any split of a forward batch is exact)."""

    cfg = _Cfg()

    def __init__(self) -> None:
        self.table = torch.randn(1000, D, generator=torch.Generator().manual_seed(0))

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks, stop_at_layer: int | None = None) -> None:
        act = self.table[tokens % 1000] + 0.5 * self.table[(torch.roll(tokens, 1, dims=1) * 7) % 1000]
        for name, fn in fwd_hooks:
            fn(act, type("Hook", (), {"name": name})())


def _stream(cls=ActivationStream) -> ActivationStream:
    return cls(FakeModel(), WINDOWS, HOOK, batch_size=64, batch_seqs=3, store_dtype="float32")   # 3 seqs: uneven split


def _dirs(root: Path) -> list[Path]:
    return [root / f"seed{s}" for s in SEEDS]


# ----------------------------------------------------------------------------------------------
# the worker (one per rank)
# ----------------------------------------------------------------------------------------------
def _worker(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from replication.distributed import ShardedActivationStream
    from replication.sae import training

    base = Path(root)
    torch.set_num_threads(1)           # two ranks on a small shared machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    writes: list[str] = []
    save_sae, save_resume = training.save_sae, training._Member.save_resume_state

    def record_save(sae, run_dir, hookpoint, info):
        writes.append(str(Path(run_dir).relative_to(base)))
        return save_sae(sae, run_dir, hookpoint, info)

    def record_resume(member):
        if member.out_dir is not None and not member.finished:
            writes.append(str((member.out_dir / training.RESUME_FILE).relative_to(base)))
        save_resume(member)

    training.save_sae, training._Member.save_resume_state = record_save, record_resume
    params: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    try:
        runs = {   # scenario: (source, data)
            "dist": (ACTS, DATA),
            # seed 0 fresh, seed 1 resumes at step 5 (rank 1 serves steps 0-4 first), seed 2 finished
            "resume": (ACTS, DATA),
            "stream": (_stream(ShardedActivationStream), STREAM_DATA),
            # seeds 0 and 2 resume at step 3, stream state in seed0/ only; seed 1 finished: rank 1 owns no
            # SAE to train and serves its forward shares from the stream state it restores from seed0/
            "stream_resume": (_stream(ShardedActivationStream), STREAM_DATA),
        }
        for name, (source, data) in runs.items():
            results = train_saes_distributed(source, _configs(), data, _dirs(base / name), progress=False,
                                             heldout=HELDOUT, save_every_steps=4 if name == "dist" else None)
            params[name] = {i: {k: v.clone() for k, v in r.sae.state_dict().items()}
                            for i, r in enumerate(results) if r is not None}
        try:
            train_saes_distributed(ACTS, _configs()[:1], DATA, progress=False)
            error = ""
        except ValueError as err:
            error = str(err)
    finally:
        dist.destroy_process_group()
    torch.save({"params": params, "writes": writes, "error": error}, base / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
def _assert_same_files(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()), f"{a} and {b} differ in layout"
    assert not any(f.name in ("resume_state.pt", "stream_state.npz") for f in files)
    for rel in files:
        if rel.suffix == ".safetensors":
            ta, tb = load_file(a / rel), load_file(b / rel)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{b / rel}: tensors differ"
            # and the bytes: one metadata key (checkpoints.save_sae), so no per-process key order
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel}: file bytes differ"
        elif rel.name == "training.json":
            ja, jb = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
            assert ja["sae_sha256"] == jb["sae_sha256"] == sha256_file(a / rel.parent / "sae.safetensors")
            for j in (ja, jb):
                j.pop("written_at")
                for key in TIMING:
                    j["metrics"].pop(key)
            assert ja == jb, f"{b / rel} differs from {a / rel}"
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


@pytest.fixture
def one_thread():
    """One intra-op thread here and in the workers (a 2-core machine shared with other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_ranks_train_the_family_bit_identical_to_one_process(tmp_path: Path, one_thread) -> None:
    # single-process references
    ref = {
        "cached": train_saes(ACTS, _configs(), DATA, _dirs(tmp_path / "single"), progress=False, heldout=HELDOUT,
                             save_every_steps=4),
        "stream": train_saes(_stream(), _configs(), STREAM_DATA, _dirs(tmp_path / "single_stream"), progress=False,
                             heldout=HELDOUT, save_every_steps=4),
    }
    # partial and finished states for the resume scenarios (written by one process, continued by two)
    cfg = _configs()
    resume, stream_resume = _dirs(tmp_path / "resume"), _dirs(tmp_path / "stream_resume")
    train_saes(ACTS, [cfg[1]], DATA, [resume[1]], progress=False, max_steps=5, heldout=HELDOUT)
    train_saes(ACTS, [cfg[2]], DATA, [resume[2]], progress=False, heldout=HELDOUT)
    train_saes(_stream(), [cfg[0], cfg[2]], STREAM_DATA, [stream_resume[0], stream_resume[2]], progress=False,
               max_steps=3, heldout=HELDOUT)
    train_saes(_stream(), [cfg[1]], STREAM_DATA, [stream_resume[1]], progress=False, heldout=HELDOUT)
    assert (stream_resume[0] / "stream_state.npz").exists() and not (stream_resume[1] / "stream_state.npz").exists()

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # (a) every SAE equals the single-process one, in memory and on disk
    for name, kind in (("dist", "cached"), ("resume", "cached"), ("stream", "stream"), ("stream_resume", "stream")):
        got = {i: p for o in out for i, p in o["params"][name].items()}
        assert sorted(got) == list(range(len(SEEDS))), name
        for i, result in enumerate(ref[kind]):
            want = result.sae.state_dict()
            assert got[i].keys() == want.keys()
            for key in want:
                assert torch.equal(got[i][key], want[key]), f"{name}: seed {SEEDS[i]} {key} differs"
        _assert_same_files(tmp_path / ("single" if kind == "cached" else "single_stream"), tmp_path / name)

    # (b) each seed's files are written by its owner only; the owners cover every seed
    for rank, o in enumerate(out):
        owned = {f"seed{SEEDS[i]}" for i in owned_indices(len(SEEDS), rank, WORLD)}
        seeds_written = {Path(w).parts[1] for w in o["writes"]}
        assert seeds_written <= owned, (rank, seeds_written)
        dist_writes = {w for w in o["writes"] if w.startswith("dist/")}
        for seed in owned:
            assert {f"dist/{seed}", f"dist/{seed}/tokens_512", f"dist/{seed}/resume_state.pt"} <= dist_writes
    finished_before = ("resume/seed2", "stream_resume/seed1")        # loaded, never rewritten
    assert not any(w.startswith(finished_before) for o in out for w in o["writes"])

    # (c) more ranks than seeds: a clear error on every rank
    for o in out:
        assert "world_size 2 exceeds the number of seeds 1" in o["error"]


def test_partition_and_shards_are_complete_and_disjoint() -> None:
    for n, world in ((9, 2), (9, 4), (3, 3)):
        parts = [owned_indices(n, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
    assert shard_sizes(256, 2) == [128, 128]
    assert shard_sizes(5, 4) == [2, 2, 1, 0]
    with pytest.raises(ValueError, match="world_size 4 exceeds the number of seeds 3"):
        owned_indices(3, 0, 4)


def test_without_a_process_group_the_error_names_it() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        train_saes_distributed(ACTS, _configs(), DATA, progress=False)


def test_entry_point_outside_torchrun_says_how_to_launch(monkeypatch) -> None:
    from replication.distributed import init_from_environment

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        init_from_environment()
    assert os.environ.get("RANK") is None
