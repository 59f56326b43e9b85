"""Foundation: embedded model, corpus, activation cache (resume, checksums, clear errors)."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from replication import activations, corpus, paths
from replication.io import read_json
from replication.lm.activations import ActivationCache, ActivationSettings, build_activation_cache
from replication.lm.models import ModelNotFoundError, load_model, next_token_loss

TINY = dict(model_name="smollm2-135m", hooks=("blocks.3.hook_mlp_out", "blocks.5.hook_resid_post"),
            n_train_tokens=630, n_heldout_tokens=63, seq_len=64, batch_seqs=2, model_dtype="float32",
            corpus_sources=("wikipedia",), corpus_max_tokens=20_000)


def test_embedded_model_predicts_text(smol_model):
    tokens = smol_model.to_tokens("The capital of France is Paris. The capital of Germany is", prepend_bos=False)
    logits = smol_model(tokens)
    assert smol_model.tokenizer.decode(logits[0, -1].argmax()).strip() == "Berlin"


def test_loss_of_trained_model_beats_random(smol_model):
    corp = corpus.build_corpus(smol_model.tokenizer, "smollm2-135m", sources=("wikipedia",), max_tokens=20_000, progress=False)
    held = corp.tokens("heldout")
    trained = next_token_loss(smol_model, held, seq_len=64, n_seqs=4)
    random_model = load_model("smollm2-135m", random_init=True)
    assert not random_model.training and not smol_model.training      # both in eval mode, as the cache uses them
    random = next_token_loss(random_model, held, seq_len=64, n_seqs=4)
    assert 1.5 < trained < 4.5, trained
    assert random > 9.0, random


def test_corpus_is_deterministic_with_fixed_heldout(smol_model):
    a = corpus.build_corpus(smol_model.tokenizer, "smollm2-135m", sources=("wikipedia",), max_tokens=20_000, progress=False)
    assert a.card["tokens"]["train"] >= 20_000 and a.card["tokens"]["heldout"] > 0
    ids = [d for d, _ in corpus.SOURCES["wikipedia"].reader()]
    held = [d for d in ids if corpus._heldout(d, 2.0)]
    assert 0.01 < len(held) / len(ids) < 0.03


def test_activation_cache_resumes_byte_identical(tmp_data, smol_model, tmp_path, monkeypatch):
    settings = ActivationSettings(**TINY)
    assert build_activation_cache(settings, model=smol_model, progress=False, max_chunks=2) is None
    folder = activations.cache_folder(settings)
    assert not (folder / "manifest.json").exists(), "an interrupted cache must not look finished"
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        ActivationCache.open(folder)
    resumed = build_activation_cache(settings, model=smol_model, progress=False)

    monkeypatch.setattr(paths, "ACTIVATIONS_DIR", tmp_path / "straight")
    straight = build_activation_cache(settings, model=smol_model, progress=False)
    for hook in settings.hooks:
        for split in ("train", "heldout"):
            a, b = resumed.array(hook, split), straight.array(hook, split)
            assert a.shape == (settings.n_train_tokens if split == "train" else settings.n_heldout_tokens, 576)
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert np.abs(np.asarray(a, dtype=np.float32)).max() > 0
    assert resumed.manifest["files"] == straight.manifest["files"]


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupted_cache_keeps_every_finished_chunk(tmp_data, smol_model, tmp_path, monkeypatch, how):
    """Ctrl-C raised between chunks, or SIGTERM mid-chunk, stops with every finished chunk recorded;
    the resumed cache is byte-identical to an uninterrupted one, and the manifest names the dtype."""
    settings = ActivationSettings(**TINY)

    def stop(n_chunks: int) -> None:
        if n_chunks == 3:
            if how == "keyboard":
                raise KeyboardInterrupt("kernel interrupt")
            os.kill(os.getpid(), signal.SIGTERM)   # deferred: acted on after this chunk is saved

    with pytest.raises(KeyboardInterrupt):
        build_activation_cache(settings, model=smol_model, progress=False, callback=stop)
    folder = activations.cache_folder(settings)
    assert read_json(folder / "progress.json")["done"] == {"train": 3}
    resumed = build_activation_cache(settings, model=smol_model, progress=False)
    assert resumed.manifest["resolved_dtypes"] == {"model": "float32"} and resumed.model_dtype == "float32"
    monkeypatch.setattr(paths, "ACTIVATIONS_DIR", tmp_path / "straight")
    straight = build_activation_cache(settings, model=smol_model, progress=False)
    assert resumed.manifest["files"] == straight.manifest["files"]


def test_corrupt_cache_fails_checksum(tmp_data, smol_model):
    settings = ActivationSettings(**{**TINY, "hooks": ("blocks.2.hook_mlp_out",)})
    cache = build_activation_cache(settings, model=smol_model, progress=False)
    path = cache.folder / "train.blocks.2.hook_mlp_out.bin"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fails its checksum"):
        ActivationCache.open(cache.folder)


def test_layer_out_of_range_is_a_clear_error(tmp_data, smol_model):
    settings = ActivationSettings(**{**TINY, "hooks": ("blocks.40.hook_mlp_out",)})
    with pytest.raises(ValueError, match=r"layer 40 out of range for smollm2-135m: it has 30 layers \(0-29\)"):
        build_activation_cache(settings, model=smol_model, progress=False)
    with pytest.raises(ValueError, match="unsupported hook"):
        activations.parse_hook("blocks.3.mlp")


def test_bad_model_name_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="unknown model 'not-a-model'"):
        load_model("not-a-model")


def test_missing_corpus_source_warns_and_continues(smol_model, monkeypatch, tmp_path):
    def missing():
        raise corpus.MissingSourceError("corpus source 'fake' not found; install it with: apt-get install fake")
        yield  # pragma: no cover

    monkeypatch.setattr(paths, "CORPUS_DIR", tmp_path)
    monkeypatch.setitem(corpus.SOURCES, "fake", corpus.CorpusSource("fake", "none", "missing", "apt-get install fake", missing))
    with pytest.warns(UserWarning, match="corpus source 'fake' not found"):
        corp = corpus.build_corpus(smol_model.tokenizer, "smollm2-135m", sources=("wikipedia", "fake"), max_tokens=5_000,
                                   progress=False)
    assert "fake" in corp.card["missing_sources"] and corp.card["tokens"]["train"] >= 5_000
    with pytest.raises(corpus.MissingSourceError, match="'fake' not found"):
        corpus.build_corpus(smol_model.tokenizer, "smollm2-135m", sources=("fake",), max_tokens=6_000, strict=True,
                            progress=False)
    with pytest.raises(ValueError, match="unknown corpus source"):
        corpus.build_corpus(smol_model.tokenizer, "smollm2-135m", sources=("nope",), progress=False)


def test_random_model_family_is_a_chance_baseline(tmp_data, smol_model):
    """An SAE trained on the random-initialised control shares ~nothing with one trained on the real model."""
    from replication import experiments, matching

    common = dict(n_train_tokens=6_300, n_heldout_tokens=630, seq_len=64, model_dtype="float32",
                  corpus_sources=("wikipedia",), corpus_max_tokens=20_000, n_latents=64, k=4,
                  seeds=(0,), batch_size=256, n_tokens=12_800, hook="blocks.3.hook_mlp_out", checkpoint_at_tokens=())
    real = experiments.seed_family(experiments.FamilySpec(**common), progress=False, model=smol_model)
    random = experiments.seed_family(experiments.FamilySpec(**common, random_model=True), progress=False)
    assert random.cache.manifest["settings"]["random_init"] is True
    assert experiments.family_dir(real.spec) != experiments.family_dir(random.spec)
    fractions = matching.shared_fractions(matching.match(real.directions[0], random.directions[0], cache=False))
    assert fractions["threshold"] < 0.1, fractions


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m", dtype="float32")


def test_second_embedded_model_gemma_loads_offline_with_bos(tmp_data, gemma):
    """Gemma-3-270m: TransformerLens config by official name (no download), weights from the package,
    its BOS at position 0 of every cached window, and its outlier-heavy activations normalised."""
    assert (gemma.cfg.n_layers, gemma.cfg.d_model, gemma.cfg.default_prepend_bos) == (18, 640, True)
    tokens = gemma.to_tokens("The capital of France is Paris. The capital of Germany is")
    assert tokens[0, 0].item() == gemma.tokenizer.bos_token_id
    assert gemma.tokenizer.decode(gemma(tokens)[0, -1].argmax()).strip() == "Berlin"
    settings = ActivationSettings(**{**TINY, "model_name": "gemma-3-270m", "store_dtype": "float32",
                                     "hooks": ("blocks.9.hook_mlp_out", "blocks.9.hook_resid_post")})
    cache = build_activation_cache(settings, model=gemma, progress=False)
    assert cache.manifest["model"]["bos_at_position_0"] is True
    x = np.asarray(cache.train("blocks.9.hook_resid_post"))
    assert np.isfinite(x).all() and x.shape == (630, 640)
    scaled = x * cache.input_scale("blocks.9.hook_resid_post")
    assert np.mean((scaled ** 2).sum(1)) == pytest.approx(640, rel=0.05)
    assert cache.manifest["model"]["bos_token_id"] == gemma.tokenizer.bos_token_id


def test_gemma_heldout_windows_reproduce_the_cached_activations(tmp_data, gemma):
    """The held-out windows rebuilt for Figure 6 contexts and splicing are the ones the model saw:
    running Gemma on them gives the cached activations row for row (BOS shift included)."""
    import torch

    hook = "blocks.9.hook_mlp_out"
    settings = ActivationSettings(**{**TINY, "model_name": "gemma-3-270m", "store_dtype": "float32", "hooks": (hook,)})
    cache = build_activation_cache(settings, model=gemma, progress=False)
    windows, info = activations.heldout_token_windows(cache)
    assert info["bos_at_position_0"] and (windows[:, 0] == gemma.tokenizer.bos_token_id).all()
    skip, per_seq = settings.skip_positions, settings.seq_len - settings.skip_positions
    with torch.inference_mode():
        _, run = gemma.run_with_cache(torch.from_numpy(windows[:2]), names_filter=hook, stop_at_layer=10)
    recomputed = run[hook][:, skip:].reshape(-1, 640).float().numpy()
    cached = np.asarray(cache.heldout(hook)[: 2 * per_seq], dtype=np.float32)
    np.testing.assert_allclose(recomputed, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())


def test_d_model_comes_from_the_config_without_building_a_cache(tmp_data, smol_model, gemma):
    """Figure 5 sizes its SAEs from d_model; reading it must not cost a forward pass over the corpus."""
    from replication import ablations
    from replication.experiments import FamilySpec

    for name, model in (("smollm2-135m", smol_model), ("gemma-3-270m", gemma)):
        spec = FamilySpec(model_name=name, hook="blocks.3.hook_resid_post")
        assert ablations.d_model(spec) == model.cfg.d_model
    assert not (tmp_data / "activations_dir").exists()
    with pytest.raises(ValueError, match="unsupported hook"):
        ablations.d_model(FamilySpec(hook="blocks.3.hook_mlp_post"))


def test_concurrent_conversions_run_once(tmp_path, monkeypatch):
    """`make test` converts Gemma in the background while notebooks may ask for it: the lock makes
    the second caller wait and then reuse the finished folder instead of converting again."""
    import threading
    import time

    from replication import models

    monkeypatch.setattr(paths, "MODELS_DIR", tmp_path / "models")
    calls = []

    def slow_convert(key, model, out):
        calls.append(key)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "converted.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.convert_embedded("gemma-3-270m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["gemma-3-270m"] and len(set(results)) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_call_weight_load_equals_transformer_lens_key_by_key(dtype):
    """`models._load_unprocessed` (one `load_state_dict`) leaves exactly the parameters and buffers that TL's
    `load_and_process_state_dict` (key by key, every processing step off) leaves, on a small gated-MLP model
    with rotary attention and untied unembedding, like the embedded ones."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from replication.lm.models import _load_unprocessed

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=8,
                                  act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                                  init_weights=False, dtype=getattr(torch, dtype))
    torch.manual_seed(0)
    source = {k: torch.randn_like(v, dtype=torch.float32).to(v.dtype) for k, v in HookedTransformer(cfg).state_dict().items()
              if not k.endswith(("rotary_sin", "rotary_cos", ".mask", "IGNORE"))}
    source.pop("blocks.1.attn.b_O")     # a missing key: both fill it the same way
    ours, theirs = HookedTransformer(cfg), HookedTransformer(cfg)
    _load_unprocessed(ours, dict(source))
    theirs.load_and_process_state_dict(dict(source), fold_ln=False, center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False, refactor_factored_attn_matrices=False)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.0.mlp.W_gate"], source["blocks.0.mlp.W_gate"])   # loaded, not left at init
    source.pop("blocks.0.mlp.W_gate")   # TL refuses a missing weight matrix (a silently dead sublayer); so do we
    with pytest.raises(Exception, match="W_gate"):
        _load_unprocessed(HookedTransformer(cfg), dict(source))
