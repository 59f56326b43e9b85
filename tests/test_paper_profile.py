"""The `paper` profile (issue #19, item 6): a clear offline failure, a streamed hub corpus, and the
`paper-embedded` rehearsal of its code paths (streaming, shuffle buffer, 2^15 latents) in `make test`."""
from __future__ import annotations

import numpy as np
import pytest

from replication import paths
from replication.experiments import FamilySpec
from replication.lm import hub
from replication.lm.models import EMBEDDED_MODELS


def _unreachable(kind: str, name: str, timeout: float) -> str:
    return "ConnectError: [Errno -2] Name or service not known"


def test_paper_profile_offline_fails_at_once_naming_every_missing_input(tmp_data, monkeypatch) -> None:
    """Offline, building the paper profile's inputs stops before any model or corpus work, with one message
    that names the hub model, the hub dataset and the offline alternative."""
    from replication.lm.activations import build_activation_cache

    monkeypatch.setattr(hub, "_probe", _unreachable)
    spec = FamilySpec.from_profile("paper", device="cpu")     # the profile's own "cuda" fails earlier here, clearly
    with pytest.raises(hub.HubUnavailableError) as err:
        build_activation_cache(spec.activation_settings(), progress=False)
    msg = str(err.value)
    assert "model 'EleutherAI/pythia-160m'" in msg and "dataset 'monology/pile-uncopyrighted'" in msg
    assert "PROFILE=paper-embedded" in msg and "Name or service not known" in msg


def test_hub_check_passes_embedded_inputs_and_parses_sources() -> None:
    calls: list[tuple[str, str]] = []

    def probe(kind: str, name: str, timeout: float) -> None:
        calls.append((kind, name))

    hub.check_hub_inputs("smollm2-135m", None, list(EMBEDDED_MODELS), probe=probe)
    hub.check_hub_inputs("smollm2-135m", ["wikipedia"], list(EMBEDDED_MODELS), probe=probe)
    assert calls == []                                          # nothing to reach for embedded inputs
    hub.check_hub_inputs("EleutherAI/pythia-160m", ["hub:a/b:cfg"], list(EMBEDDED_MODELS), probe=probe)
    assert calls == [("model", "EleutherAI/pythia-160m"), ("dataset", "a/b")]
    assert hub.parse_hub_source("hub:a/b:cfg") == ("a/b", "cfg")
    with pytest.raises(ValueError, match="hub:<owner>/<dataset>"):
        hub.parse_hub_source("hub:pile")


class _Tok:
    """A character-level stand-in for a tokenizer (the hub corpus needs only call, len and eos)."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 300

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 250 for c in t] for t in texts]}


def test_hub_corpus_streams_documents_to_disk_with_held_out_split(tmp_path, monkeypatch) -> None:
    from replication.lm import corpus as C

    monkeypatch.setattr(paths, "CORPUS_DIR", tmp_path / "corpus")
    docs = [(f"pile/{i}", f"document number {i} " * (1 + i % 5)) for i in range(3000)]
    seen = []

    def documents(source):
        for d in docs:
            seen.append(d[0])
            yield d

    corpus = C._build_hub_corpus(_Tok(), "tok", "hub:a/b", 20_000, 2.0, False, documents=documents)
    train, held = np.asarray(corpus.tokens("train")), np.asarray(corpus.tokens("heldout"))
    assert 20_000 <= len(train) < 20_000 + 200 and len(held) >= 400
    assert len(seen) < len(docs)                                # stops reading once both splits are full
    first_train = next(d for d in docs if not C._heldout(d[0], 2.0))
    np.testing.assert_array_equal(train[:len(first_train[1])], [1 + ord(c) % 250 for c in first_train[1]])
    assert corpus.card["tokens"]["train"] == len(train)
    again = C.build_corpus(_Tok(), "tok", sources=["hub:a/b"], max_tokens=20_000, progress=False)
    assert again.folder == corpus.folder                         # reused, not rebuilt
    with pytest.raises(ValueError, match="used alone"):
        C.build_corpus(_Tok(), "tok", sources=["hub:a/b", "wikipedia"], max_tokens=1000)
    with pytest.raises(ValueError, match="set corpus_max_tokens"):
        C.build_corpus(_Tok(), "tok", sources=["hub:a/b"], max_tokens=None)


def test_paper_embedded_profile_streams_a_few_steps_at_2_15_latents(smol_model) -> None:
    """The paper profile's code paths offline: SmolLM2 and the embedded corpus streamed through a shuffle
    buffer, TopK at 2^15 latents and k 32. Budgets (batch, buffer, steps, seeds, window length, cached
    tokens, corpus) are cut to seconds, and the float32 model is the session's; the paths are the profile's."""
    from replication import experiments
    from replication.io import read_json

    profile = FamilySpec.from_profile("paper-embedded")
    assert (profile.n_latents, profile.k, profile.activation_source, profile.seq_len) == (32768, 32, "stream", 1024)
    assert profile.stream_buffer_tokens >= profile.batch_size and profile.model_name in EMBEDDED_MODELS
    spec = FamilySpec.from_profile("paper-embedded", seeds=(0, 1), batch_size=512, stream_buffer_tokens=1024,
                                   n_tokens=1024, checkpoint_at_tokens=(), n_train_tokens=1016,
                                   n_heldout_tokens=127, seq_len=128, corpus_sources=("wikipedia",),
                                   corpus_max_tokens=150_000, model_dtype="float32", select_dtype="float32")
    family = experiments.seed_family(spec, progress=False, model=smol_model)
    infos = [read_json(r.checkpoint_dir / "training.json") for r in family.results]
    assert [i["n_batches"] for i in infos] == [2, 2]
    assert infos[0]["data_stream_sha256"] == infos[1]["data_stream_sha256"]
    assert family.results[0].sae.W_dec.shape[0] == 32768
