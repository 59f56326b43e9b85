"""Streaming training (issue #19, item 1): activations made on the fly, a shuffle buffer, seed isolation, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication.lm.streaming import STATE_FILE, ActivationStream
from replication.sae.training import DataConfig, TrainConfig, train_saes

D = 16
HOOK = "blocks.1.hook_mlp_out"


class _Cfg:
    d_model = D


class FakeModel:
    """A deterministic stand-in for a HookedTransformer: position p of a window gets a fixed function of its
    token and of the previous one (so activations depend on context), captured by the hook like the real one."""

    cfg = _Cfg()

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(1000, D, generator=g)
        self.forwards = 0

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks, stop_at_layer: int | None = None) -> None:
        self.forwards += 1
        prev = torch.roll(tokens, 1, dims=1)
        act = self.table[tokens % 1000] + 0.5 * self.table[(prev * 7) % 1000]
        for name, fn in fwd_hooks:
            fn(act, type("Hook", (), {"name": name})())


WINDOWS = np.random.default_rng(0).integers(0, 5000, size=(40, 9))   # 40 windows of 9 tokens, 8 kept each


def _stream(**kw) -> ActivationStream:
    args = dict(batch_size=32, skip_positions=1, data_seed=0, buffer_tokens=0, batch_seqs=3, store_dtype="float32")
    return ActivationStream(FakeModel(), WINDOWS, HOOK, **{**args, **kw})


def test_without_a_buffer_batches_are_the_windows_in_order_cycling() -> None:
    s = _stream()
    ids = np.concatenate([s.next_batch(i)[0] for i in range(15)])     # 480 rows = 1.5 passes over 320
    np.testing.assert_array_equal(ids, np.arange(480))                # global positions, in order
    rows = np.concatenate([_stream().next_batch(i)[1] for i in range(1)])
    expected = FakeModel()
    captured = {}
    expected.run_with_hooks(torch.from_numpy(WINDOWS[:4]), [(HOOK, lambda a, h: captured.setdefault("x", a))])
    np.testing.assert_array_equal(rows, captured["x"][:, 1:].reshape(-1, D)[:32].numpy())
    with pytest.raises(ValueError, match="read in order"):
        s.next_batch(3)


def test_shuffle_buffer_mixes_documents_and_its_order_is_a_function_of_data_seed() -> None:
    a, b, c = _stream(buffer_tokens=128), _stream(buffer_tokens=128), _stream(buffer_tokens=128, data_seed=1)
    ids_a = [a.next_batch(i)[0] for i in range(12)]
    ids_b = [b.next_batch(i)[0] for i in range(12)]
    ids_c = [c.next_batch(i)[0] for i in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(ids_a, ids_b))     # same data seed: same batches
    assert not all(np.array_equal(x, y) for x, y in zip(ids_a, ids_c))  # another data seed: another order
    flat = np.concatenate(ids_a)
    assert len(np.unique(flat)) == len(flat)                            # no row is served twice
    spans = [x.max() - x.min() for x in ids_a]
    assert np.median(spans) > 64                                        # a batch spans many windows (8 rows each)
    with pytest.raises(ValueError, match="buffer_tokens >= batch_size"):
        _stream(buffer_tokens=16)


def test_streamed_family_shares_batches_across_seeds_and_resumes_bit_identically(tmp_path) -> None:
    """Every seed of a streamed family sees the same batches (equal hashes); a run stopped midway (and a fresh
    stream object) continues from the saved stream state and ends with the same weights as a straight run."""
    data = DataConfig(batch_size=32, n_tokens=32 * 20, data_seed=0)
    cfgs = [TrainConfig(architecture="topk", n_latents=24, k=3, seed=s, lr=3e-3) for s in (0, 1)]
    straight = train_saes(_stream(buffer_tokens=96), cfgs, data, progress=False)
    assert straight[0].batch_hashes == straight[1].batch_hashes and len(set(straight[0].batch_hashes)) == 20
    dirs = [tmp_path / "seed0", tmp_path / "seed1"]
    first = train_saes(_stream(buffer_tokens=96), cfgs, data, out_dirs=dirs, progress=False, max_steps=7)
    assert not first[0].finished and (dirs[0] / STATE_FILE).exists()
    resumed = train_saes(_stream(buffer_tokens=96), cfgs, data, out_dirs=dirs, progress=False)
    for a, b in zip(straight, resumed):
        assert a.batch_hashes == b.batch_hashes
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), key
    assert not (dirs[0] / STATE_FILE).exists()                        # removed once finished
    # an interrupt (Ctrl-C / SIGTERM reach the loop as KeyboardInterrupt) saves the stream too
    dirs2 = [tmp_path / "i0", tmp_path / "i1"]

    def stop(step: int) -> None:
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_saes(_stream(buffer_tokens=96), cfgs, data, out_dirs=dirs2, progress=False, callback=stop)
    again = train_saes(_stream(buffer_tokens=96), cfgs, data, out_dirs=dirs2, progress=False)
    assert again[0].batch_hashes == straight[0].batch_hashes
    assert torch.equal(again[1].sae.W_dec, straight[1].sae.W_dec)


def test_stream_errors_name_the_problem(tmp_path) -> None:
    data = DataConfig(batch_size=32, n_tokens=None)
    cfg = [TrainConfig(architecture="topk", n_latents=24, k=3, seed=0, lr=3e-3)]
    with pytest.raises(ValueError, match="needs DataConfig.n_tokens"):
        train_saes(_stream(), cfg, data, progress=False)
    with pytest.raises(ValueError, match="batches of 32 tokens"):
        train_saes(_stream(), cfg, DataConfig(batch_size=64, n_tokens=640), progress=False)
    # a state saved by another stream (here: another data seed) is refused, not silently continued
    dirs = [tmp_path / "s0"]
    train_saes(_stream(buffer_tokens=96), cfg, DataConfig(batch_size=32, n_tokens=640), out_dirs=dirs,
               progress=False, max_steps=3)
    with pytest.raises(ValueError, match="another stream"):
        train_saes(_stream(buffer_tokens=96, data_seed=5), cfg, DataConfig(batch_size=32, n_tokens=640),
                   out_dirs=dirs, progress=False)


def test_stream_equals_the_cache_for_the_same_windows(tmp_data, smol_model) -> None:
    """With the buffer off, the real model's streamed rows equal the cached ones bit for bit (CPU, float32)."""
    from replication.lm.activations import (
        ActivationSettings,
        _sequences,
        build_activation_cache,
        model_windows,
    )
    from replication.lm.corpus import build_corpus

    settings = ActivationSettings(model_name="smollm2-135m", hooks=("blocks.3.hook_mlp_out",), n_train_tokens=630,
                                  n_heldout_tokens=63, seq_len=64, batch_seqs=2, model_dtype="float32",
                                  corpus_sources=("wikipedia",), corpus_max_tokens=20_000)
    cache = build_activation_cache(settings, model=smol_model, progress=False)
    corpus = build_corpus(smol_model.tokenizer, "smollm2-135m", sources=settings.corpus_sources,
                          max_tokens=settings.corpus_max_tokens, seed=settings.corpus_seed, progress=False)
    windows = model_windows(_sequences(corpus.tokens("train"), 64, 630, 1), None)
    stream = ActivationStream(smol_model, windows, "blocks.3.hook_mlp_out", batch_size=63, skip_positions=1,
                              batch_seqs=2, store_dtype="float16")
    rows = np.concatenate([stream.next_batch(i)[1] for i in range(10)])
    np.testing.assert_array_equal(rows, np.asarray(cache.train("blocks.3.hook_mlp_out")))


def test_streamed_seed_family_trains_with_shared_batches_and_keeps_cached_keys(smol_model) -> None:
    """`activation_source: stream` through `experiments.seed_family`: every seed reads the same streamed batches;
    the cached families' keys are unchanged by the new settings (their checkpoints stay valid)."""
    import dataclasses

    from replication import experiments
    from replication.io import read_json

    cached = experiments.FamilySpec(model_dtype="float32", select_dtype="float32", n_tokens=4_000_000,
                                      n_train_tokens=1_000_000)   # the budget and cache then
    assert cached.training_key() == "883c1d1386c1"          # the key before streaming existed
    spec = experiments.FamilySpec.from_profile("smoke", activation_source="stream", stream_buffer_tokens=1024,
                                               n_latents=32, seeds=(0, 1), n_tokens=256 * 12, checkpoint_at_tokens=())
    assert spec.training_key() != dataclasses.replace(spec, activation_source="cache", stream_buffer_tokens=0).training_key()
    # the session's float32 model where the stream wants float32 (the float32 path): one model load fewer
    model = smol_model if spec.resolved_dtypes()["model"] == "float32" else None
    family = experiments.seed_family(spec, progress=False, model=model)
    infos = [read_json(r.checkpoint_dir / "training.json") for r in family.results]
    assert infos[0]["data_stream_sha256"] == infos[1]["data_stream_sha256"] and infos[0]["n_batches"] == 12
    assert infos[0]["data_hash"].startswith("stream-")
    with pytest.raises(ValueError, match="choose 'cache' or 'stream'"):
        experiments.seed_family(dataclasses.replace(spec, activation_source="disk"), progress=False)
    with pytest.raises(ValueError, match=">= batch_size"):
        experiments.seed_family(dataclasses.replace(spec, stream_buffer_tokens=10), progress=False)
