"""Figure 6 / Table 1: are latents found in one seed only interpretable? (contexts and scoring)

The paper explains every latent with Llama-3.1-70B and scores each explanation by *detection*
(Paulo et al. 2024): given the explanation, predict which of 100 activating and 100
non-activating contexts make the latent fire; the score is the balanced accuracy. Here:

* **Contexts** come from the held-out split of the family's activation cache. The cache keeps
  activations only, so the token windows are rebuilt exactly as `activations.build_activation_cache`
  cut them: the corpus named in the cache manifest, its held-out token stream cut into
  `seq_len` windows, the first `skip_positions` of each dropped; kept position `a` is token
  `skip + a % per_seq` of window `a // per_seq`. Each window is cut into non-overlapping
  contexts of `ctx_len` tokens (the tail that does not fill a context is unused), so a
  context's activation rows are contiguous and its per-latent maximum is a reshape.
* **Selection** per latent (deterministic): the `n_explain` top-activating contexts are shown to
  the explainer; the scoring positives are a random sample of the *other* activating contexts
  and the scoring negatives a random sample of non-activating ones, disjoint from the
  non-activating contexts an explainer may fit on (`n_train_neg`). Balanced accuracy is
  therefore always measured on contexts the explainer never saw.
* **Explainers and scorers** live in `replication.explainers` (lexical rule, the embedded
  SmolLM2-135M-Instruct, or any OpenAI-compatible endpoint); `score_latents` runs any pair and
  caches every row (explanation, balanced accuracy, AUROC, who produced them) under
  `data/interpretability/`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import paths
from ..analysis.stats import auc, balanced_accuracy, permutation_test, spearman_with_permutation
from ..claims import tested_verdict
from ..experiments import FinishedFamily
from ..io import atomic_path, read_json, settings_key, write_json_atomic
from ..lm.activations import heldout_token_windows
from ..sae.architectures import on_device

INTERP_DIR_NAME = "interpretability"
FORMAT_VERSION = 1


def interp_dir() -> Path:
    """Cache folder of this module (`data/interpretability/`)."""
    return paths.DATA_DIR / INTERP_DIR_NAME


# --------------------------------------------------------------------------- token contexts
@dataclass
class HeldoutContexts:
    """Token contexts of the held-out split aligned with the cached activations.

    `tokens[c]` are the `ctx_len` token ids of context c and `rows[c]` the matching rows of the
    held-out activation array (`rows[c] = first_row[c] + arange(ctx_len)`).
    """

    tokens: np.ndarray          # int64 [n_contexts, ctx_len]
    first_row: np.ndarray       # int64 [n_contexts]
    ctx_len: int
    n_rows: int                 # rows of the held-out activation array
    decode: Callable[[int], str] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, contexts: np.ndarray) -> np.ndarray:
        """Activation rows `[len(contexts), ctx_len]` of the given contexts."""
        return self.first_row[np.asarray(contexts)][:, None] + np.arange(self.ctx_len)

    def strings(self, contexts: np.ndarray) -> list[list[str]]:
        """Decoded token strings of the given contexts (needs `decode`)."""
        if self.decode is None:
            raise ValueError("these contexts carry no tokenizer; build them with heldout_contexts(...)")
        return [[self.decode(int(t)) for t in self.tokens[c]] for c in np.asarray(contexts)]


def context_layout(n_rows: int, per_seq: int, ctx_len: int) -> np.ndarray:
    """First activation row of every whole `ctx_len` context (contexts never cross windows)."""
    if ctx_len < 1 or ctx_len > per_seq:
        raise ValueError(f"ctx_len must be in 1..{per_seq} (kept positions per window); got {ctx_len}")
    if n_rows < ctx_len:
        raise ValueError(f"{n_rows} held-out rows cannot hold one context of {ctx_len} tokens")
    per_window = per_seq // ctx_len
    n_seq = -(-n_rows // per_seq)
    starts = (np.arange(n_seq)[:, None] * per_seq + np.arange(per_window)[None, :] * ctx_len).reshape(-1)
    return starts[starts + ctx_len <= n_rows].astype(np.int64)


def load_tokenizer(model_name: str):
    """The tokenizer of an embedded model key or a hub name."""
    from transformers import AutoTokenizer

    from ..lm.models import EMBEDDED_MODELS, convert_embedded

    if model_name in EMBEDDED_MODELS:
        return AutoTokenizer.from_pretrained(str(convert_embedded(model_name)))
    return AutoTokenizer.from_pretrained(model_name)


def token_decoder(tokenizer) -> Callable[[int], str]:
    """Memoised single-token decode (byte-level BPE pieces may show as U+FFFD).

    Special tokens (the corpus separates documents with EOS) read as a line break, so chat
    templates never see control tokens inside a context.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    memo: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in memo:
            memo[token] = "\n" if int(token) in special else tokenizer.decode([int(token)])
        return memo[token]

    return decode


def heldout_contexts(cache, ctx_len: int = 16, tokenizer=None) -> HeldoutContexts:
    """Contexts of `ctx_len` tokens over the cache's held-out split, with token ids and rows."""
    settings = cache.manifest["settings"]
    windows, source = heldout_token_windows(cache)
    per_seq = source["seq_len"] - source["skip_positions"]
    n_rows = int(settings["n_heldout_tokens"])
    first = context_layout(n_rows, per_seq, ctx_len)
    seq, offset = first // per_seq, first % per_seq
    cols = source["skip_positions"] + offset[:, None] + np.arange(ctx_len)[None, :]
    tokens = windows[seq[:, None], cols].astype(np.int64)
    if tokenizer is None:
        tokenizer = load_tokenizer(settings["model_name"])
    return HeldoutContexts(tokens, first, ctx_len, n_rows, token_decoder(tokenizer),
                           {**source, "ctx_len": ctx_len, "activation_cache": cache.folder.name})


# --------------------------------------------------------------------------- latent activations
@torch.no_grad()
def token_activations(sae, activations: np.ndarray, rows: np.ndarray, latents: np.ndarray | None = None,
                      device: str | torch.device | None = None) -> np.ndarray:
    """Latent activations at the given activation rows: float32 `[*rows.shape, n_latents or len(latents)]`."""
    rows = np.asarray(rows)
    device = torch.device(device) if device is not None else sae.device
    flat = torch.as_tensor(np.asarray(activations[rows.reshape(-1)], dtype=np.float32), device=device)
    dense = sae.encode_activations(flat).dense(sae.n_latents).float()
    if latents is not None:
        dense = dense[:, torch.as_tensor(np.asarray(latents), device=device)]
    return dense.cpu().numpy().reshape(*rows.shape, -1)


@torch.no_grad()
def context_max(sae, activations: np.ndarray, contexts: HeldoutContexts, batch_contexts: int = 256,
                device: str | torch.device | None = None) -> np.ndarray:
    """Per-context maximum activation of every latent: float32 `[n_contexts, n_latents]`."""
    if activations.shape[0] != contexts.n_rows:
        raise ValueError(f"activations have {activations.shape[0]} rows, the contexts were cut from {contexts.n_rows}")
    sae = on_device(sae, device)
    out = np.zeros((contexts.n_contexts, sae.n_latents), np.float32)
    for start in range(0, contexts.n_contexts, batch_contexts):
        idx = np.arange(start, min(start + batch_contexts, contexts.n_contexts))
        acts = token_activations(sae, activations, contexts.rows(idx))
        out[idx] = acts.max(axis=1)
    return out


# --------------------------------------------------------------------------- selection
@dataclass
class ContextSettings:
    """How contexts are cut and split per latent (the paper: 100 activating + 100 non-activating)."""

    ctx_len: int = 16
    n_explain: int = 10          # top-activating contexts shown to the explainer
    n_score_pos: int = 100       # held-out activating contexts scored (fewer if the latent is rarer)
    n_score_neg: int = 100       # held-out non-activating contexts scored
    n_train_neg: int = 50        # non-activating contexts an explainer may fit on (never scored)
    min_score_pos: int = 5       # latents with fewer held-out activating contexts are not scored
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ctx_len", "n_explain", "n_score_pos", "n_score_neg", "min_score_pos"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ContextSettings.{name} must be >= 1; got {getattr(self, name)}")
        if self.n_train_neg < 0:
            raise ValueError(f"ContextSettings.n_train_neg must be >= 0; got {self.n_train_neg}")

    def key(self) -> str:
        return settings_key({**asdict(self), "format": FORMAT_VERSION})


@dataclass
class LatentContexts:
    """Context indices of one latent; every array is disjoint from the others."""

    latent: int
    explain: np.ndarray        # top activating, strongest first
    score_pos: np.ndarray      # random activating, not in `explain`
    score_neg: np.ndarray      # random non-activating
    train_neg: np.ndarray      # random non-activating, not scored
    n_active: int              # activating contexts in the held-out split

    @property
    def scorable(self) -> bool:
        return len(self.score_pos) > 0 and len(self.score_neg) > 0


def select_contexts(ctx_max: np.ndarray, latent: int, settings: ContextSettings) -> LatentContexts:
    """Split one latent's contexts into explain / score-positive / score-negative / train-negative."""
    col = np.asarray(ctx_max[:, latent], dtype=np.float32)
    active = np.flatnonzero(col > 0)
    inactive = np.flatnonzero(col <= 0)
    order = active[np.argsort(-col[active], kind="stable")]
    explain = order[: settings.n_explain]
    rest = order[settings.n_explain:]
    rng = np.random.default_rng([settings.seed, int(latent)])
    pos = rng.permutation(rest)[: settings.n_score_pos]
    if len(pos) < settings.min_score_pos:
        pos = pos[:0]
    neg = rng.permutation(inactive)
    n_train = min(settings.n_train_neg, len(neg) // 2)   # frequent latents: at most half the negatives for fitting
    train_neg, score_neg = neg[:n_train], neg[n_train: n_train + settings.n_score_neg]
    return LatentContexts(int(latent), explain, np.sort(pos), np.sort(score_neg), np.sort(train_neg), int(len(active)))


def context_cache_path(sae_hash: str, contexts: HeldoutContexts) -> Path:
    key = settings_key({"sae": sae_hash, **{k: v for k, v in contexts.source.items()}, "format": FORMAT_VERSION})
    return interp_dir() / "contexts" / f"{sae_hash}-{key}.npz"


def cached_context_max(sae, sae_hash: str, activations: np.ndarray, contexts: HeldoutContexts,
                       device: str | torch.device | None = None) -> np.ndarray:
    """`context_max`, cached under `data/interpretability/contexts/` (float16 on disk)."""
    path = context_cache_path(sae_hash, contexts)
    if path.exists():
        with np.load(path) as f:
            arr = f["ctx_max"].astype(np.float32)
        if arr.shape == (contexts.n_contexts, sae.n_latents):
            return arr
    arr = context_max(sae, activations, contexts, device=device)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, ctx_max=arr.astype(np.float16))
    write_json_atomic(path.with_suffix(".json"), {"sae": sae_hash, "source": contexts.source,
                                                  "shape": list(arr.shape)})
    with np.load(path) as f:
        return f["ctx_max"].astype(np.float32)   # what later runs will read (fp16-rounded)


# --------------------------------------------------------------------------- examples for explainers
@dataclass
class LatentExamples:
    """What an explainer may see of one latent: top contexts with per-token activations and
    non-activating contexts (never the scoring contexts)."""

    latent: int
    tokens: np.ndarray          # int64 [n_explain, ctx_len]
    acts: np.ndarray            # float32 [n_explain, ctx_len]
    neg_tokens: np.ndarray      # int64 [n_train_neg, ctx_len]
    decode: Callable[[int], str]

    def strings(self) -> list[list[str]]:
        return [[self.decode(int(t)) for t in row] for row in self.tokens]

    def neg_strings(self) -> list[list[str]]:
        return [[self.decode(int(t)) for t in row] for row in self.neg_tokens]


def latent_examples(sae, activations: np.ndarray, contexts: HeldoutContexts, sel: LatentContexts) -> LatentExamples:
    """Per-token activations of the explain contexts of one latent (recomputed, cheap)."""
    acts = token_activations(sae, activations, contexts.rows(sel.explain), latents=np.array([sel.latent]))[..., 0]
    return LatentExamples(sel.latent, contexts.tokens[sel.explain], acts.astype(np.float32),
                          contexts.tokens[sel.train_neg], contexts.decode)


def latent_examples_batch(sae, activations: np.ndarray, contexts: HeldoutContexts,
                          sels: Sequence[LatentContexts]) -> list[LatentExamples]:
    """`latent_examples` for many latents with one SAE pass over the union of their top contexts."""
    if not sels:
        return []
    union = np.unique(np.concatenate([s.explain for s in sels]))
    acts = token_activations(sae, activations, contexts.rows(union))          # [n_union, ctx_len, n_latents]
    where = {int(c): i for i, c in enumerate(union)}
    out = []
    for s in sels:
        idx = np.array([where[int(c)] for c in s.explain], dtype=np.int64)
        out.append(LatentExamples(s.latent, contexts.tokens[s.explain], acts[idx, :, s.latent].astype(np.float32),
                                  contexts.tokens[s.train_neg], contexts.decode))
    return out


# --------------------------------------------------------------------------- running explainer + scorer
def _results_path(sae_hash: str, settings: ContextSettings, contexts: HeldoutContexts, explainer, scorer) -> Path:
    key = settings_key({"sae": sae_hash, "contexts": settings.key(), "source": contexts.source,
                        "explainer": explainer.config(), "scorer": scorer.config(), "format": FORMAT_VERSION})
    return interp_dir() / "scores" / f"{sae_hash}-{explainer.name}-{scorer.name}-{key}.json"


def score_latents(sae, sae_hash: str, activations: np.ndarray, contexts: HeldoutContexts, ctx_max: np.ndarray,
                  latents: Sequence[int], explainer, scorer, settings: ContextSettings, batch_latents: int = 8,
                  cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """Explain and detection-score `latents` of one SAE; one row per latent.

    Rows hold the explanation, the balanced accuracy of the scorer's yes/no decisions on the
    held-out scoring contexts, the AUROC of its continuous scores, the class counts, the
    explainer and scorer names, and the seconds spent. Latents whose held-out activating
    contexts are too few get NaN scores (`status` says why). Finished rows are cached per
    (SAE, settings, explainer, scorer) and reused.
    """

    latents = [int(l) for l in latents]
    bad = [l for l in latents if not 0 <= l < sae.n_latents]
    if bad:
        raise ValueError(f"latent indices {bad[:5]} out of range 0..{sae.n_latents - 1}")
    path = _results_path(sae_hash, settings, contexts, explainer, scorer)
    done: dict[str, dict] = read_json(path)["rows"] if (cache and path.exists()) else {}
    todo = [l for l in dict.fromkeys(latents) if str(l) not in done]
    bar = tqdm(total=len(todo), desc=f"{explainer.name} / {scorer.name}", unit="latent", disable=not progress)
    for start in range(0, len(todo), batch_latents):
        chunk = todo[start:start + batch_latents]
        sels = [select_contexts(ctx_max, l, settings) for l in chunk]
        ready = [s for s in sels if s.scorable]
        for s in sels:
            if not s.scorable:
                done[str(s.latent)] = _row(s, None, None, None, explainer, scorer, 0.0, 0.0,
                                           status=f"too rare: {s.n_active} activating contexts")
        if ready:
            t0 = time.time()
            explanations = explainer.explain(latent_examples_batch(sae, activations, contexts, ready))
            t1 = time.time()
            labelled = [np.concatenate([s.score_pos, s.score_neg]) for s in ready]
            calibration = [(contexts.tokens[s.explain], contexts.tokens[s.train_neg]) for s in ready]
            outcomes = scorer.score(explanations, [contexts.tokens[c] for c in labelled], contexts.decode,
                                    calibration=calibration)
            t2 = time.time()
            for s, e, (decisions, scores) in zip(ready, explanations, outcomes):
                labels = np.r_[np.ones(len(s.score_pos), bool), np.zeros(len(s.score_neg), bool)]
                done[str(s.latent)] = _row(s, e, labels, (decisions, scores), explainer, scorer,
                                           (t1 - t0) / len(ready), (t2 - t1) / len(ready), status="ok")
        if cache:
            write_json_atomic(path, {"settings": asdict(settings), "source": contexts.source, "sae": sae_hash,
                                     "explainer": explainer.config(), "scorer": scorer.config(), "rows": done})
        bar.update(len(chunk))
    bar.close()
    return pd.DataFrame([done[str(l)] for l in latents])


def _row(sel: LatentContexts, explanation, labels, outcome, explainer, scorer, explain_s: float, score_s: float,
         status: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "latent": sel.latent, "explainer": explainer.name, "scorer": scorer.name, "status": status,
        "n_active_contexts": sel.n_active, "n_pos": int(len(sel.score_pos)), "n_neg": int(len(sel.score_neg)),
        "explanation": None, "rule": None, "balanced_accuracy": float("nan"), "auroc": float("nan"),
        "balanced_accuracy_at_zero": float("nan"),
        "tpr": float("nan"), "tnr": float("nan"), "explain_s": explain_s, "score_s": score_s,
    }
    if outcome is not None:
        decisions, scores = (np.asarray(o) for o in outcome)
        decisions, labels = decisions.astype(bool), np.asarray(labels, bool)
        row.update(explanation=explanation.text, rule=explanation.rule,
                   balanced_accuracy=balanced_accuracy(labels, decisions), auroc=auc(scores[labels], scores[~labels]),
                   balanced_accuracy_at_zero=balanced_accuracy(labels, scores > 0),
                   tpr=float(decisions[labels].mean()), tnr=float((~decisions[~labels]).mean()))
    return row


# --------------------------------------------------------------------------- sampling and analysis
def stratified_sample(groups: np.ndarray, n_per_group: int, eligible: np.ndarray | None = None,
                      seed: int = 0) -> np.ndarray:
    """Up to `n_per_group` indices from every group value (e.g. shared count), sorted."""
    groups = np.asarray(groups)
    eligible = np.ones(len(groups), bool) if eligible is None else np.asarray(eligible, bool)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero((groups == g) & eligible))[:n_per_group] for g in np.unique(groups)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def pair_alignment(a, b, partner: np.ndarray) -> np.ndarray:
    """Mean of decoder and encoder cosines between latent i of `a` and latent `partner[i]` of `b`."""
    from ..analysis.matching import unit_rows

    dec = (unit_rows(a.decoder) * unit_rows(b.decoder)[partner]).sum(1)
    enc = (unit_rows(a.encoder) * unit_rows(b.encoder)[partner]).sum(1)
    return 0.5 * (dec + enc)


def score_by_shared_count(scores: pd.DataFrame, column: str = "balanced_accuracy", high: float = 0.8) -> pd.DataFrame:
    """Per shared count: number of scored latents, mean/median/quartiles, fraction >= `high`."""
    ok = scores.dropna(subset=[column])
    g = ok.groupby("shared_count")[column]
    return pd.DataFrame({"latents": g.size(), "mean": g.mean(), "median": g.median(),
                         "q25": g.quantile(0.25), "q75": g.quantile(0.75),
                         f"frac_ge_{high}": g.apply(lambda s: float((s >= high).mean()))})


def table1_pairs(pairs: pd.DataFrame, bins: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                 threshold: float = 0.7) -> pd.DataFrame:
    """Table 1's selection: one pair per alignment bin. Above `threshold`, the pair maximising the
    sum of both scores; below it, the pair maximising score_1 - score_2 (good in seed 1, poor in 2)."""
    need = {"alignment", "score_1", "score_2"}
    if not need <= set(pairs.columns):
        raise ValueError(f"pairs need columns {sorted(need)}; got {sorted(pairs.columns)}")
    ok = pairs.dropna(subset=["score_1", "score_2"])
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = ok[(ok.alignment >= lo) & ((ok.alignment < hi) | ((hi == bins[-1]) & (ok.alignment <= hi)))]
        if inside.empty:
            rows.append({"bin": f"[{lo:.1f}, {hi:.1f})", "alignment": float("nan")})
            continue
        mid = 0.5 * (lo + hi)
        key = inside.score_1 + inside.score_2 if mid > threshold else inside.score_1 - inside.score_2
        rows.append({"bin": f"[{lo:.1f}, {hi:.1f})", **inside.loc[key.idxmax()].to_dict()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- notebook-level helpers
def score_seed(family: FinishedFamily, seed_index: int, contexts: HeldoutContexts, latents: Sequence[int] | None,
               explainer, scorer, settings: ContextSettings, shared_counts: np.ndarray, batch_latents: int = 8,
               progress: bool = False) -> pd.DataFrame:
    """`score_latents` for one seed of a family (all latents when `latents` is None), with the seed,
    each latent's shared count and its held-out context maximum attached."""
    sae, dirs = family.saes[seed_index], family.directions[seed_index]
    held = family.cache.heldout(family.spec.hook)
    cm = cached_context_max(sae, dirs.content_hash, held, contexts, device=family.spec.device)
    latents = np.arange(sae.n_latents) if latents is None else np.asarray(latents)
    rows = score_latents(sae, dirs.content_hash, held, contexts, cm, latents, explainer, scorer, settings,
                         batch_latents=batch_latents, progress=progress)
    rows.insert(0, "seed", int(family.spec.seeds[seed_index]))
    rows["shared_count"] = np.asarray(shared_counts)[seed_index][rows.latent.to_numpy()]
    return rows


def matched_pairs(scores_a: pd.DataFrame, scores_b: pd.DataFrame, partner: np.ndarray, alignment: np.ndarray,
                  shared: np.ndarray) -> pd.DataFrame:
    """Seed-a latents with their Hungarian (decoder) partner in seed b: alignment, shared flag, both
    explanations and both scores (NaN where a side was not scored)."""
    a = scores_a.set_index("latent")
    b = scores_b.set_index("latent")
    lat = a.index.to_numpy()
    part = np.asarray(partner)[lat]
    out = pd.DataFrame({"latent_1": lat, "latent_2": part, "alignment": np.asarray(alignment)[lat],
                        "shared": np.asarray(shared)[lat], "score_1": a.balanced_accuracy.to_numpy(),
                        "explanation_1": a.explanation.to_numpy()})
    out["score_2"] = b.balanced_accuracy.reindex(part).to_numpy()
    out["explanation_2"] = b.explanation.reindex(part).to_numpy()
    return out


def alignment_score_gap(pairs: pd.DataFrame, threshold: float = 0.7, n_perm: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Do poorly aligned partners (decoder cosine < `threshold`) disagree more in score than well-aligned ones?

    The statistic is mean |score_1 - score_2| of the low-alignment pairs minus that of the others (`matched_pairs`
    rows with both scores), with a two-sided permutation p-value. The units are the latent pairs of one seed pair
    (Figure 6 studies two seeds), so no seed-level variance enters: the p-value says whether the gap is more
    than a relabelling of these latents would give. The verdict is "yes" only for a gap above 0 at p < 0.05;
    a bare comparison of the two means would call a gap of either sign half the time under the null."""
    good = pairs.dropna(subset=["score_1", "score_2"])
    diff = (good.score_1 - good.score_2).abs().to_numpy(np.float64)
    low = good.alignment.to_numpy() < threshold
    out: dict[str, Any] = {"threshold": threshold, "n_low": int(low.sum()), "n_high": int((~low).sum())}
    if out["n_low"] < 2 or out["n_high"] < 2:
        return {**out, "gap": None, "p_value": None, "verdict": "not testable: fewer than 2 scored pairs on a side"}
    test = permutation_test(diff[low], diff[~low], n_perm=n_perm, seed=seed)
    gap, p = test["observed"], test["p_value"]
    verdict = tested_verdict(gap, p).replace("opposite", "opposite (well-aligned pairs differ more)")
    return {**out, "gap": gap, "p_value": p, "n_perm": n_perm, "verdict": verdict}


def summary_numbers(scores: pd.DataFrame, pairs: pd.DataFrame, n_other: int, high: float = 0.8,
                    threshold: float = 0.7) -> dict[str, Any]:
    """The numbers Figure 6 is read by: score quartiles, per-shared-count table, the shared-vs-orphan
    contrast with a permutation-tested Spearman rho, and the pair statistics of the right panel."""
    ok = scores.dropna(subset=["balanced_accuracy"])
    ba = ok.balanced_accuracy.to_numpy()
    orphans, everywhere = ok[ok.shared_count == 0], ok[ok.shared_count == n_other]
    good = pairs.dropna(subset=["score_1", "score_2"])
    low, high_al = good[good.alignment < threshold], good[good.alignment >= threshold]
    return {
        "scored_latents": int(len(ok)), "unscored_latents": int(len(scores) - len(ok)),
        "mean": float(ba.mean()) if len(ba) else None, "q25": float(np.quantile(ba, 0.25)) if len(ba) else None,
        "q75": float(np.quantile(ba, 0.75)) if len(ba) else None,
        "mean_auroc": float(ok.auroc.mean()) if len(ok) else None,
        "by_shared_count": score_by_shared_count(ok, high=high).reset_index().to_dict(orient="records"),
        "mean_orphan": float(orphans.balanced_accuracy.mean()) if len(orphans) else None,
        "mean_shared_with_all": float(everywhere.balanced_accuracy.mean()) if len(everywhere) else None,
        "orphans_scored": int(len(orphans)),
        "frac_orphans_ge_high": float((orphans.balanced_accuracy >= high).mean()) if len(orphans) else None,
        "frac_all_ge_high": float((ok.balanced_accuracy >= high).mean()) if len(ok) else None,
        "spearman_shared_count_vs_score": spearman_with_permutation(ok.shared_count.to_numpy(), ba),
        "pairs_scored": int(len(good)),
        "mean_abs_score_diff_low_alignment": float((low.score_1 - low.score_2).abs().mean()) if len(low) else None,
        "mean_abs_score_diff_high_alignment": float((high_al.score_1 - high_al.score_2).abs().mean()) if len(high_al) else None,
        "score_gap_low_vs_high_alignment": alignment_score_gap(pairs, threshold),
        "score_correlation_low_alignment": float(np.corrcoef(low.score_1, low.score_2)[0, 1]) if len(low) > 2 else None,
        "score_correlation_high_alignment": (float(np.corrcoef(high_al.score_1, high_al.score_2)[0, 1])
                                             if len(high_al) > 2 else None),
    }


