"""Family trainer: seed isolation, shared batch stream, bit-identical resume, checkpoints, errors."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from replication.interrupts import Interrupted
from replication.sae.checkpoints import load_sae
from replication.sae.training import (
    BatchStream,
    DataConfig,
    TrainConfig,
    _lr_factor,
    evaluate_sae,
    train_saes,
)

D_IN = 16


def _sparse_data(n_rows: int, seed: int = 0) -> np.ndarray:
    """Tokens that are sparse combinations of 48 ground-truth directions (learnable by an SAE)."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((48, D_IN))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = rng.exponential(1.0, (n_rows, 48)) * (rng.random((n_rows, 48)) < 0.06)
    return (codes @ dictionary + 0.01 * rng.standard_normal((n_rows, D_IN))).astype(np.float32)


ACTS = _sparse_data(3000)
DATA = DataConfig(batch_size=128, n_tokens=128 * 24, data_seed=3)


def _topk(seed: int, **kw) -> TrainConfig:
    return TrainConfig(architecture="topk", n_latents=64, k=4, seed=seed, lr=3e-3, **kw)


def _params(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.sae.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# ----------------------------------------------------------------------------------------------
def test_batch_stream_is_a_seeded_permutation_cycling_epochs() -> None:
    stream = BatchStream(n_rows=10, batch_size=4, data_seed=1)
    batches = [stream.indices(s) for s in range(5)]            # 20 positions = 2 epochs
    assert all(np.all(np.diff(b) >= 0) for b in batches)       # sorted within a batch
    flat0 = np.concatenate([stream.permutation(0)[:10]])
    np.testing.assert_array_equal(np.sort(flat0), np.arange(10))
    assert not np.array_equal(stream.permutation(0), stream.permutation(1))  # fresh permutation per epoch
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.repeat(np.arange(10), 2))
    again = BatchStream(n_rows=10, batch_size=4, data_seed=1)
    assert all(np.array_equal(again.indices(s), batches[s]) for s in (4, 0, 2))  # stateless in the step
    other = BatchStream(n_rows=10, batch_size=4, data_seed=2)
    assert not all(np.array_equal(other.indices(s), batches[s]) for s in range(5))


def test_lr_schedule_is_linear_warmup_then_linear_decay() -> None:
    assert _lr_factor(0, 4, 10) == 0.0
    assert _lr_factor(2, 4, 10) == 0.5
    assert _lr_factor(4, 4, 10) == 1.0
    assert _lr_factor(7, 4, 10) == pytest.approx(0.5)
    assert _lr_factor(10, 4, 10) == 0.0
    assert TrainConfig(n_latents=2**14).resolved_lr() == pytest.approx(2e-4)
    assert TrainConfig(n_latents=2**16).resolved_lr() == pytest.approx(1e-4)


def test_seeds_share_batches_and_family_equals_solo_training() -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    family = train_saes(ACTS, [_topk(0), _topk(1)], DATA, progress=False)
    torch.manual_seed(999)
    solo = train_saes(ACTS, [_topk(1)], DATA, progress=False)[0]
    assert family[0].batch_hashes == family[1].batch_hashes == solo.batch_hashes
    assert len(family[0].batch_hashes) == 24 and len(set(family[0].batch_hashes)) == 24
    _assert_same(_params(family[1]), _params(solo))       # a seed's run does not depend on its family
    assert not torch.equal(family[0].sae.W_dec, family[1].sae.W_dec)
    changed = DataConfig(batch_size=128, n_tokens=128 * 24, data_seed=4)
    assert train_saes(ACTS, [_topk(0)], changed, progress=False)[0].batch_hashes != family[0].batch_hashes


def test_training_learns_and_reports_metrics() -> None:
    data = DataConfig(batch_size=128, n_tokens=128 * 60, data_seed=0)
    res = train_saes(ACTS, [_topk(0)], data, progress=False, heldout=ACTS[:500])[0]
    m = res.metrics
    assert res.finished and res.steps == 60 and m["tokens"] == 60 * 128
    assert res.fvu_history[-1] < 0.8 * res.fvu_history[0]
    assert m["fvu_source"] == "heldout" and 0 < m["fvu"] < 0.45
    assert m["l0"] <= 4 and 0.0 <= m["dead_fraction"] <= 1.0 and m["tokens_per_s"] > 0
    torch.testing.assert_close(res.sae.W_dec.norm(dim=1), torch.ones(64))
    assert evaluate_sae(res.sae, ACTS[:500])["fvu"] == pytest.approx(m["fvu"])


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_dense_architectures_train(arch: str) -> None:
    cfg = TrainConfig(architecture=arch, n_latents=64, seed=0, lr=3e-3, l1_coefficient=0.05)
    res = train_saes(ACTS, [cfg], DATA, progress=False)[0]
    assert res.fvu_history[-1] < res.fvu_history[0]


def test_resume_after_max_steps_stop_is_bit_identical(tmp_path) -> None:
    cfgs = [_topk(0, checkpoint_at_tokens=[128 * 10]), _topk(1)]
    straight = train_saes(ACTS, cfgs, DATA, progress=False)
    dirs = [tmp_path / "a", tmp_path / "b"]
    part = train_saes(ACTS, cfgs, DATA, out_dirs=dirs, progress=False, max_steps=9)
    assert not part[0].finished and part[0].steps == 9 and (dirs[0] / "resume_state.pt").exists()
    resumed = train_saes(ACTS, cfgs, DATA, out_dirs=dirs, progress=False)
    for a, b in zip(straight, resumed):
        assert b.finished
        _assert_same(_params(a), _params(b))
        assert a.batch_hashes == b.batch_hashes
    assert not (dirs[0] / "resume_state.pt").exists()
    # the intermediate checkpoint at 1280 tokens was written in the resumed segment and loads
    inter = resumed[0].intermediate_dirs[1280]
    assert json.loads((inter / "layer" / "training.json").read_text())["metrics"]["tokens"] == 1280
    load_sae(inter)
    # final files on disk reproduce the in-memory model
    _assert_same(_params(resumed[0]), {k: v for k, v in load_sae(dirs[0]).state_dict().items()})
    # a finished run is loaded, not retrained
    again = train_saes(ACTS, cfgs, DATA, out_dirs=dirs, progress=False)
    assert again[0].finished and again[0].metrics == resumed[0].metrics
    _assert_same(_params(again[0]), _params(resumed[0]))


def test_resume_after_crash_is_bit_identical(tmp_path) -> None:
    cfg = [TrainConfig(architecture="topk", n_latents=64, k=4, seed=5, lr=3e-3, auxk_alpha=1 / 32,
                       dead_window_tokens=256)]
    straight = train_saes(ACTS, cfg, DATA, progress=False)[0]

    def crash(step: int) -> None:
        if step == 13:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_saes(ACTS, cfg, DATA, out_dirs=[tmp_path], progress=False, save_every_steps=5, callback=crash)
    state = torch.load(tmp_path / "resume_state.pt", weights_only=True)
    # the interrupt saved the state of the step it followed (14 steps done), not the periodic one (10)
    assert state["step"] == 14
    resumed = train_saes(ACTS, cfg, DATA, out_dirs=[tmp_path], progress=False)[0]
    _assert_same(_params(straight), _params(resumed))
    assert straight.fvu_history == resumed.fvu_history


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_resume_state_and_resume_is_exact(tmp_path, signum) -> None:
    """A SIGTERM or Ctrl-C (Jupyter's kernel interrupt) mid-run stops at the end of the current step
    with the resume state written, even with periodic saves off; the resumed run is bit-identical."""
    cfgs = [_topk(0), _topk(1)]
    straight = train_saes(ACTS, cfgs, DATA, progress=False)
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    previous = signal.getsignal(signum)

    def kill(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signum)   # delivered now; acted on once the step's bookkeeping is done

    with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name):
        train_saes(ACTS, cfgs, DATA, out_dirs=dirs, progress=False, save_every_steps=None, save_every_seconds=None,
                   callback=kill)
    assert signal.getsignal(signum) is previous          # the handler in force before is restored
    for d in dirs:
        assert torch.load(d / "resume_state.pt", weights_only=True)["step"] == 7
    resumed = train_saes(ACTS, cfgs, DATA, out_dirs=dirs, progress=False)
    for a, b in zip(straight, resumed):
        _assert_same(_params(a), _params(b))
        assert a.fvu_history == b.fvu_history


def test_second_signal_stops_at_once_without_saving(tmp_path) -> None:
    """Two signals in one step: the second cannot wait, and nothing (possibly torn) is saved."""
    def kill_twice(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train_saes(ACTS, [_topk(0)], DATA, out_dirs=[tmp_path], progress=False, save_every_steps=None,
                   save_every_seconds=None, callback=kill_twice)
    assert info.value.forced
    assert not (tmp_path / "resume_state.pt").exists()


def test_out_dir_of_a_different_run_is_refused(tmp_path) -> None:
    train_saes(ACTS, [_topk(0)], DATA, out_dirs=[tmp_path], progress=False, max_steps=2)
    with pytest.raises(ValueError, match="different run"):
        train_saes(ACTS, [_topk(1)], DATA, out_dirs=[tmp_path], progress=False)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="activation width 16 != d_in 8"):
        train_saes(ACTS, [_topk(0, d_in=8)], DATA, progress=False)
    with pytest.raises(ValueError, match="k=80 > n_latents=64"):
        train_saes(ACTS, [TrainConfig(n_latents=64, k=80)], DATA, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_saes(np.zeros((0, D_IN), np.float32), [_topk(0)], DATA, progress=False)
    with pytest.raises(ValueError, match="different d_in"):
        train_saes(ACTS, [_topk(0, d_in=16), _topk(1, d_in=8)], DATA, progress=False)
    with pytest.raises(ValueError, match="smaller than one batch"):
        train_saes(ACTS, [_topk(0)], DataConfig(batch_size=128, n_tokens=100), progress=False)
    bad = ACTS.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        train_saes(bad, [_topk(0)], DataConfig(batch_size=3000, n_tokens=3000), progress=False)


def test_bf16_selection_trains() -> None:
    res = train_saes(ACTS, [_topk(0, select_dtype="bfloat16")], DATA, progress=False)[0]
    exact = train_saes(ACTS, [_topk(0)], DATA, progress=False)[0]
    # near-ties at the k-th latent may be broken differently; the trajectory stays the same
    np.testing.assert_allclose(res.fvu_history, exact.fvu_history, atol=0.01)


def test_init_from_continues_from_given_weights(tmp_path) -> None:
    first = train_saes(ACTS, [_topk(0)], DATA, progress=False)[0]
    # a different seed started from seed 0's weights ends where seed 0 continued would: the seed
    # only drives initialisation, and the batch stream is shared
    cont_a = train_saes(ACTS, [_topk(0)], DATA, progress=False, init_from=[first.sae])[0]
    cont_b = train_saes(ACTS, [_topk(5)], DATA, progress=False, init_from=[first.sae])[0]
    _assert_same(_params(cont_a), _params(cont_b))
    fresh = train_saes(ACTS, [_topk(5)], DATA, progress=False)[0]
    assert not torch.equal(_params(fresh)["W_dec"], _params(cont_b)["W_dec"])
    assert cont_b.metrics["fvu"] <= first.metrics["fvu"] + 0.05
    with pytest.raises(ValueError, match="out_dirs=None"):
        train_saes(ACTS, [_topk(0)], DATA, out_dirs=[tmp_path / "a"], init_from=[first.sae])
    with pytest.raises(ValueError, match="init_from entries"):
        train_saes(ACTS, [_topk(0), _topk(1)], DATA, init_from=[first.sae])
