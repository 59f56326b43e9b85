"""Tests for replication.studies.interpretability and replication.studies.explainers (Figure 6 / Table 1).

Synthetic contexts with a planted "cat" latent check the selection, the metrics and the
whole explain -> score loop (lexical rule, and an OpenAI-compatible chat endpoint served by a
fake `http.server` on localhost). Real-data tests check that rebuilt held-out contexts line up
with the cached activations of the smoke family (skipped when that family is not built).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest
import torch

from replication import explainers as E
from replication import interpretability as I
from replication import paths, stats
from replication.sae.architectures import SAEBase

# --------------------------------------------------------------------------- synthetic world
VOCAB = ["the", " cat", " dog", " sat", " on", " mat", ".", " a", " 42", "\n", " Paris", " ran"]
CAT = VOCAB.index(" cat")


def decode(t: int) -> str:
    return VOCAB[t]


class PlantedSAE(SAEBase):
    """A stand-in SAE: latent 0 fires on the token ' cat' (its activations carry the token id
    in dimension 0), latent 1 never fires, latent 2 fires on every token."""

    def __init__(self) -> None:
        super().__init__(4, 3, normalize_decoder=False)
        self.w = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        is_cat = (x[:, 0].round() == CAT).float()
        return torch.stack([is_cat * (1 + x[:, 1]), torch.zeros_like(is_cat), torch.ones_like(is_cat)], 1)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    ctx_len, n_ctx = 8, 300
    tokens = rng.integers(0, len(VOCAB), size=(n_ctx, ctx_len))
    tokens[tokens == CAT] = 0
    has_cat = rng.random(n_ctx) < 0.3
    tokens[has_cat, rng.integers(0, ctx_len, has_cat.sum())] = CAT
    acts = np.zeros((n_ctx * ctx_len, 4), np.float32)
    acts[:, 0] = tokens.reshape(-1)
    acts[:, 1] = rng.random(n_ctx * ctx_len)
    ctx = I.HeldoutContexts(tokens, np.arange(n_ctx) * ctx_len, ctx_len, n_ctx * ctx_len, decode, {"synthetic": 1})
    return ctx, acts, has_cat


@pytest.fixture
def tmp_interp(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "DATA_DIR", tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- layout and selection
def test_context_layout_stays_inside_windows():
    first = I.context_layout(n_rows=1000, per_seq=255, ctx_len=16)
    assert len(first) == 3 * 15 + (1000 - 3 * 255) // 16
    assert np.all(first // 255 == (first + 15) // 255), "a context crosses a window boundary"
    assert np.all(first + 16 <= 1000) and len(np.unique(first)) == len(first)
    with pytest.raises(ValueError, match="ctx_len"):
        I.context_layout(1000, 255, 300)


def test_context_max_matches_planted_latent(world):
    ctx, acts, has_cat = world
    cm = I.context_max(PlantedSAE(), acts, ctx, batch_contexts=37)
    assert cm.shape == (ctx.n_contexts, 3)
    assert np.array_equal(cm[:, 0] > 0, has_cat)
    assert np.all(cm[:, 1] == 0) and np.all(cm[:, 2] == 1)


def test_select_contexts_disjoint_and_ordered(world):
    ctx, acts, has_cat = world
    cm = I.context_max(PlantedSAE(), acts, ctx)
    s = I.ContextSettings(ctx_len=8, n_explain=10, n_score_pos=20, n_score_neg=30, n_train_neg=40)
    sel = I.select_contexts(cm, 0, s)
    parts = [sel.explain, sel.score_pos, sel.score_neg, sel.train_neg]
    assert [len(p) for p in parts] == [10, 20, 30, 40]
    assert len(np.unique(np.concatenate(parts))) == 100, "explain/score/train contexts must be disjoint"
    assert np.all(has_cat[np.concatenate([sel.explain, sel.score_pos])])
    assert not np.any(has_cat[np.concatenate([sel.score_neg, sel.train_neg])])
    top = cm[sel.explain, 0]
    assert np.all(np.diff(top) <= 0) and top.min() >= cm[sel.score_pos, 0].max()
    again = I.select_contexts(cm, 0, s)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.explain, again.score_pos, again.score_neg, again.train_neg]))
    assert not I.select_contexts(cm, 1, s).scorable          # never fires
    assert not I.select_contexts(cm, 2, s).scorable          # always fires: no negatives
    with pytest.raises(ValueError, match="n_explain"):
        I.ContextSettings(n_explain=0)


# --------------------------------------------------------------------------- metrics
def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return stats.auc(scores[labels], scores[~labels])


def test_balanced_accuracy_and_auroc():
    """One AUC for the whole package (`stats.auc`): the scorer's AUROC is it, applied to scores split by label."""
    labels = np.array([1, 1, 1, 1, 0, 0], bool)
    assert stats.balanced_accuracy(labels, labels) == 1.0
    assert stats.balanced_accuracy(labels, ~labels) == 0.0
    assert stats.balanced_accuracy(labels, np.ones(6, bool)) == 0.5      # "always yes" is chance, whatever the balance
    assert stats.balanced_accuracy(labels, np.array([1, 1, 0, 0, 0, 1], bool)) == pytest.approx(0.5 * (0.5 + 0.5))
    assert _auroc(labels, np.array([4, 3, 2, 1, 0, -1.0])) == 1.0
    assert _auroc(labels, np.zeros(6)) == 0.5
    assert _auroc(labels, np.array([0, 0, 0, 0, 1, 1.0])) == 0.0
    with pytest.raises(ValueError, match="both"):
        stats.balanced_accuracy(np.ones(3, bool), np.ones(3, bool))


# --------------------------------------------------------------------------- lexical pipeline
def test_lexical_explainer_finds_planted_token_and_scores_it(world, tmp_interp):
    ctx, acts, _ = world
    sae = PlantedSAE()
    cm = I.context_max(sae, acts, ctx)
    s = I.ContextSettings(ctx_len=8, n_explain=10, n_score_pos=30, n_score_neg=30, n_train_neg=40)
    rows = I.score_latents(sae, "planted", acts, ctx, cm, [0, 1], E.LexicalExplainer(), E.RuleScorer(), s, progress=False)
    cat = rows.set_index("latent").loc[0]
    assert cat.rule["tokens"] == ["cat"] and "cat" in cat.explanation
    assert cat.balanced_accuracy == 1.0 and cat.auroc == 1.0 and cat.n_pos == 30 and cat.n_neg == 30
    assert cat.explainer == "lexical" and cat.scorer == "rule"
    never = rows.set_index("latent").loc[1]
    assert np.isnan(never.balanced_accuracy) and never.status.startswith("too rare")
    assert len(list((tmp_interp / "interpretability" / "scores").glob("*.json"))) == 1


class CountingExplainer(E.LexicalExplainer):
    calls = 0

    def explain(self, examples):
        CountingExplainer.calls += len(examples)
        return super().explain(examples)


def test_score_latents_reuses_cache(world, tmp_interp):
    ctx, acts, _ = world
    sae = PlantedSAE()
    cm = I.context_max(sae, acts, ctx)
    s = I.ContextSettings(ctx_len=8, n_explain=5, n_score_pos=10, n_score_neg=10, n_train_neg=10)
    first = I.score_latents(sae, "planted", acts, ctx, cm, [0], CountingExplainer(), E.RuleScorer(), s, progress=False)
    n = CountingExplainer.calls
    second = I.score_latents(sae, "planted", acts, ctx, cm, [0], CountingExplainer(), E.RuleScorer(), s, progress=False)
    assert CountingExplainer.calls == n, "cached rows must not be explained again"
    pd.testing.assert_frame_equal(first, second)
    with pytest.raises(ValueError, match="out of range"):
        I.score_latents(sae, "planted", acts, ctx, cm, [7], E.LexicalExplainer(), E.RuleScorer(), s, progress=False)


def test_rule_scorer_needs_a_rule():
    with pytest.raises(ValueError, match="rule"):
        E.RuleScorer().score([E.Explanation(0, "cats")], [np.zeros((2, 3), int)], decode)


def test_highlight_and_token_classes():
    assert E.highlight(["a", " cat", " sat", "."], np.array([0, 2.0, 1.0, 0])) == "a<< cat sat>>."
    assert E.token_key(" Cat ") == "cat" and E.token_key("\n") == "\n"
    assert E.TOKEN_CLASSES["digits"](" 42") and not E.TOKEN_CLASSES["digits"](" cat")
    assert E.apply_rule({"tokens": [], "classes": ["punctuation"]}, [["a", "."], ["b"]]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown token class"):
        E.apply_rule({"classes": ["nope"]}, [["a"]])


# --------------------------------------------------------------------------- OpenAI-compatible endpoint
class FakeChat(BaseHTTPRequestHandler):
    """Minimal `/v1/chat/completions`: explains everything as 'the word cat'; as a detection
    scorer answers Yes when the quoted text contains ' cat'."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions" or body.get("model") != "fake-70b":
            self.send_response(404)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        if "Does the text contain" in user:
            text = user.split('Text: "', 1)[1].rsplit('"', 1)[0]
            answer = "Yes." if " cat" in text else "No"
        else:
            answer = "The word cat.\nMore text the parser must drop."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_server():
    server = HTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeChat.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_pipeline_end_to_end(world, tmp_interp, fake_server):
    ctx, acts, _ = world
    sae = PlantedSAE()
    cm = I.context_max(sae, acts, ctx)
    s = I.ContextSettings(ctx_len=8, n_explain=5, n_score_pos=8, n_score_neg=8, n_train_neg=4)
    backend = E.OpenAICompatibleChat(fake_server, "fake-70b", api_key="sk-test")
    rows = I.score_latents(sae, "planted", acts, ctx, cm, [0], E.LLMExplainer(backend), E.LLMScorer(backend), s,
                           progress=False)
    row = rows.iloc[0]
    assert row.explanation == "The word cat."
    assert row.balanced_accuracy == 1.0 and row.auroc == 1.0
    assert row.explainer == "llm[openai:fake-70b]" and row.scorer == "detection[openai:fake-70b]"
    assert len(FakeChat.seen) == 1 + 16
    assert all(r["auth"] == "Bearer sk-test" for r in FakeChat.seen)
    explain_prompt = FakeChat.seen[0]["body"]["messages"][-1]["content"]
    assert "<< cat>>" in explain_prompt
    scored = [r["body"]["messages"][-1]["content"] for r in FakeChat.seen[1:]]
    top_texts = ["".join(decode(t) for t in ctx.tokens[c]) for c in I.select_contexts(cm, 0, s).explain]
    assert not any(f'"{t}"' in p for t in top_texts for p in scored), "scored a context the explainer saw"


def test_openai_endpoint_errors_are_named(fake_server):
    with pytest.raises(RuntimeError, match="HTTP 404"):
        E.OpenAICompatibleChat(fake_server, "other-model", retries=0).chat([{"role": "user", "content": "hi"}], 5)
    with pytest.raises(RuntimeError, match="unreachable"):
        E.OpenAICompatibleChat("http://127.0.0.1:9", "m", retries=0, timeout=2).chat([{"role": "user", "content": "x"}], 5)
    with pytest.raises(ValueError, match="http"):
        E.OpenAICompatibleChat("localhost:8000", "m")
    with pytest.raises(ValueError, match="openai"):
        E.make_pipeline("openai")


def test_parse_yes_no_and_clean():
    assert E.parse_yes_no(" Yes, it does") == 1.0 and E.parse_yes_no("no.") == -1.0 and E.parse_yes_no("maybe") == 0.0
    assert E.clean_explanation("\n  Numbers in dates.\nSecond line") == "Numbers in dates."
    assert E.clean_explanation("   ") == "(empty)"


# --------------------------------------------------------------------------- analysis helpers
def test_table1_selection_rule():
    pairs = pd.DataFrame({"alignment": [0.1, 0.15, 0.9, 0.95, 0.5],
                          "score_1": [0.9, 0.7, 0.8, 0.9, 0.6], "score_2": [0.5, 0.2, 0.8, 0.95, 0.6]})
    t = I.table1_pairs(pairs)
    assert len(t) == 5
    low = t.iloc[0]
    assert low.score_1 == 0.7 and low.score_2 == 0.2, "below 0.7: maximise score_1 - score_2"
    high = t.iloc[4]
    assert high.alignment == 0.95, "above 0.7: maximise the sum"
    assert np.isnan(t.iloc[1].alignment)
    with pytest.raises(ValueError, match="columns"):
        I.table1_pairs(pd.DataFrame({"alignment": [0.1]}))


def test_stratified_sample_and_alignment():
    groups = np.array([0] * 10 + [1] * 3 + [2] * 20)
    pick = I.stratified_sample(groups, 4, seed=1)
    assert np.bincount(groups[pick]).tolist() == [4, 3, 4]
    assert np.array_equal(pick, I.stratified_sample(groups, 4, seed=1))
    from replication.sae.directions import LatentDirections

    rng = np.random.default_rng(0)
    a = LatentDirections(rng.standard_normal((5, 4)), rng.standard_normal((5, 4)))
    perm = rng.permutation(5)
    b = LatentDirections(a.encoder[perm], a.decoder[perm])
    assert np.allclose(I.pair_alignment(a, b, np.argsort(perm)), 1.0, atol=1e-6)
    sp = stats.spearman_with_permutation(np.arange(20), np.arange(20) ** 2, n_perm=200)
    assert sp["rho"] == pytest.approx(1.0) and sp["p_value"] < 0.01


def test_spearman_matches_scipy_drops_non_finite_pairs_and_is_nan_where_undefined() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    y[:25] += x[:25]
    assert stats.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    x_nan = x.copy()
    x_nan[[4, 9]] = np.nan
    keep = np.isfinite(x_nan)
    assert stats.spearman(x_nan, y) == pytest.approx(spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert stats.spearman_with_permutation(x_nan, y, n_perm=50)["rho"] == stats.spearman(x_nan, y)
    assert np.isnan(stats.spearman(np.ones(10), y[:10])) and np.isnan(stats.spearman(x[:2], y[:2]))
    assert np.isnan(stats.spearman_with_permutation(np.ones(10), y[:10])["p_value"])


# --------------------------------------------------------------------------- real data (smoke family)
def _smoke_family():
    """The smoke family `make nbval` trained; fails (never skips) when it is missing."""
    from replication import experiments

    spec = experiments.FamilySpec.from_profile("smoke")
    assert (experiments.family_dir(spec) / f"seed{spec.seeds[-1]}").exists(), \
        "smoke family not trained yet: run `make nbval` (make test does) first"
    return experiments.seed_family(spec, progress=False)


def test_rebuilt_contexts_line_up_with_cached_activations(smol_model):
    """Recompute the hook activations of a few rebuilt contexts and compare with the cache: an
    off-by-one in the token layout would decorrelate them."""
    family = _smoke_family()
    ctx = I.heldout_contexts(family.cache, ctx_len=16, tokenizer=smol_model.tokenizer)
    held = family.cache.heldout(family.spec.hook)
    windows, source = I.heldout_token_windows(family.cache)
    per_seq = source["seq_len"] - source["skip_positions"]
    assert ctx.n_contexts == len(I.context_layout(held.shape[0], per_seq, 16))
    with torch.inference_mode():
        _, cache = smol_model.run_with_cache(torch.from_numpy(windows[:2].astype(np.int64)),
                                             names_filter=lambda n: n == family.spec.hook)
    fresh = cache[family.spec.hook][:, source["skip_positions"]:].reshape(-1, held.shape[1]).numpy()
    for c in [0, 1, 3, per_seq // 16 + 2]:
        rows = ctx.rows(np.array([c]))[0]
        seq, off = divmod(int(rows[0]), per_seq)
        assert np.array_equal(ctx.tokens[c], windows[seq, source["skip_positions"] + off: source["skip_positions"] + off + 16])
        got, want = np.asarray(held[rows], np.float32), fresh[rows]
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98
        shifted = fresh[rows + 1]
        assert np.corrcoef(got.ravel(), shifted.ravel())[0, 1] < 0.9


def test_context_max_agrees_with_firing_counts():
    family = _smoke_family()
    held = family.cache.heldout(family.spec.hook)
    ctx = I.heldout_contexts(family.cache, ctx_len=16)
    sae = family.results[0].sae
    cm = I.context_max(sae, held, ctx)
    covered = np.zeros(held.shape[0], bool)
    covered[ctx.rows(np.arange(ctx.n_contexts)).ravel()] = True
    from replication.sae.architectures import firing_counts

    counts_covered = firing_counts(sae, np.asarray(held)[covered], progress=False)
    assert np.array_equal(cm.max(0) > 0, counts_covered > 0)


def test_local_chat_model_answers():
    backend = E.LocalChatModel("smollm2-135m", dtype="float32", batch_size=2)
    scores = backend.yes_no([E.score_messages("the word cat", list(" the cat sat")),
                             E.score_messages("numbers", list(" hello there"))])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
    text = backend.generate([[{"role": "user", "content": "Say hi."}]], max_new_tokens=4)
    assert isinstance(text[0], str) and len(text[0]) > 0


def test_calibrated_threshold_uses_only_calibration_scores():
    pos, neg = np.array([-1.0, -0.5, 0.2]), np.array([-3.0, -2.5, -2.0])
    thr = E.calibrated_threshold(pos, neg)
    assert -2.0 < thr < -1.0, "a scorer that always says 'no' still separates after calibration"
    assert E.calibrated_threshold(np.array([]), neg) == 0.0
    assert E.calibrated_threshold(np.ones(3), np.ones(3)) == 0.0


def test_matched_pairs_and_summary():
    a = pd.DataFrame({"latent": [0, 1, 2], "balanced_accuracy": [0.9, 0.6, np.nan], "explanation": ["x", "y", None],
                      "auroc": [0.9, 0.6, np.nan], "shared_count": [0, 2, 1]})
    b = pd.DataFrame({"latent": [2, 0], "balanced_accuracy": [0.5, 0.95], "explanation": ["p", "q"],
                      "auroc": [0.5, 0.95], "shared_count": [0, 2]})
    partner = np.array([2, 0, 1])
    pairs = I.matched_pairs(a, b, partner, np.array([0.1, 0.9, 0.5]), np.array([False, True, False]))
    assert pairs.score_2.tolist()[:2] == [0.5, 0.95] and np.isnan(pairs.score_2.iloc[2])
    n = I.summary_numbers(pd.concat([a, b]), pairs, n_other=2)
    assert n["scored_latents"] == 4 and n["unscored_latents"] == 1
    assert n["mean_abs_score_diff_low_alignment"] == pytest.approx(0.4)
    assert n["mean_abs_score_diff_high_alignment"] == pytest.approx(0.35)


def _scored_pairs(n: int, gap: float, seed: int) -> "pd.DataFrame":
    """Matched pairs whose scores differ by |N(0, 0.1)| plus `gap` where the alignment is below 0.7."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    alignment = rng.uniform(0.2, 1.0, n)
    s1 = rng.uniform(0.5, 0.9, n)
    s2 = s1 + rng.normal(0, 0.1, n) + np.where(alignment < 0.7, gap, 0.0) * rng.choice([-1, 1], n)
    return pd.DataFrame({"alignment": alignment, "score_1": s1, "score_2": s2})


def test_alignment_score_gap_says_yes_on_a_real_gap_and_not_on_a_null_of_the_same_size() -> None:
    """Figure 6's "low-alignment pairs: scores differ" verdict. Power: a 0.2 gap at 80 pairs is "yes" every
    time. Calibration: with no gap, at most 3 "yes" in 40 draws (1 expected: "yes" is one side of a two-sided 5%
    test), while the
    bare comparison of the two means it replaced says "differ" about half the time."""
    from replication import interpretability as interp

    assert all(interp.alignment_score_gap(_scored_pairs(80, 0.2, s), n_perm=500)["verdict"] == "yes" for s in range(5))
    null = [interp.alignment_score_gap(_scored_pairs(80, 0.0, 100 + s), n_perm=500) for s in range(40)]
    assert sum(r["verdict"] == "yes" for r in null) <= 3, [(round(r["gap"], 3), r["p_value"]) for r in null]
    assert sum(r["gap"] > 0 for r in null) >= 10
    few = _scored_pairs(80, 0.0, 0)
    few.loc[few.alignment < 0.7, "score_2"] = np.nan                    # no scored low-alignment pair left
    assert interp.alignment_score_gap(few)["verdict"].startswith("not testable")
