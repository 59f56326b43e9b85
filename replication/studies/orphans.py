"""Figure 6 and Table 1 as one call: are orphan latents interpretable? (notebook 08).

`orphan_study` scores every latent of two seeds with the offline lexical explainer + rule scorer, a
stratified sample with an LLM explainer + detection scorer (if asked), pairs each latent of seed a with
its Hungarian partner in seed b, and returns an `OrphanStudy` whose `.summary()` is the figure JSON's
numbers. The pieces live in `interpretability` (contexts, scoring, tables) and `explainers` (pipelines).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.matching import shared_masks
from ..experiments import FinishedFamily
from . import explainers
from . import interpretability as interp

TABLE1_COLUMNS = ["bin", "alignment", "latent_1", "latent_2", "explanation_1", "score_1", "explanation_2", "score_2"]


@dataclass
class LLMSettings:
    """The LLM explainer + scorer of Figure 6 (`pipeline` "none" skips it)."""

    pipeline: str = "local"            # "local" (embedded chat model), "openai" (endpoint below) or "none"
    model: str = "smollm2-135m"
    dtype: str = "auto"
    batch_size: int = 16
    max_new_tokens: int = 24
    per_count: int = 1                 # seed-a latents per shared count (plus their seed-b partners)
    max_latents: int | None = None
    n_score_pos: int = 8
    n_score_neg: int = 8
    n_calibration: int = 4
    base_url: str | None = None
    endpoint_model: str | None = None


@dataclass
class OrphanStudy:
    """Scores of two seeds' latents (lexical for all, LLM for a sample), their matched pairs, and the settings."""

    seeds: tuple[int, int]
    n_other: int
    definition: str
    threshold: float
    high: float
    contexts: interp.HeldoutContexts
    counts: np.ndarray
    lexical: pd.DataFrame              # both seeds
    lexical_pairs: pd.DataFrame
    lexical_s: float
    sample: np.ndarray
    llm: pd.DataFrame | None
    llm_pairs: pd.DataFrame | None
    llm_s: float
    pipelines: dict[str, Any]

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Table 1 analogues (lexical, LLM): one matched pair per alignment bin."""
        lex = interp.table1_pairs(self.lexical_pairs).reindex(columns=TABLE1_COLUMNS)
        llm = (interp.table1_pairs(self.llm_pairs).reindex(columns=TABLE1_COLUMNS) if self.llm_pairs is not None
               else pd.DataFrame(columns=TABLE1_COLUMNS))
        return lex, llm

    def summary(self) -> dict[str, Any]:
        """The numbers Figure 6 and Table 1 are read by (plain JSON)."""
        lex_numbers = interp.summary_numbers(self.lexical, self.lexical_pairs, self.n_other, high=self.high,
                                             threshold=self.threshold)
        llm_numbers = None
        if self.llm is not None:
            llm_numbers = interp.summary_numbers(self.llm, self.llm_pairs, self.n_other, high=self.high, threshold=self.threshold)
        table_lex, table_llm = self.tables()
        records = lambda t: t.to_dict(orient="records")
        return {
            "seeds": [int(s) for s in self.seeds], "n_other_seeds": self.n_other, "definition": self.definition,
            "threshold": self.threshold, "n_contexts": self.contexts.n_contexts, "ctx_len": self.contexts.ctx_len,
            "pipelines": self.pipelines, "lexical": lex_numbers, "llm": llm_numbers,
            "llm_sample": [int(x) for x in self.sample],
            "table1_lexical": records(table_lex), "table1_llm": records(table_llm) if len(table_llm) else [],
            "lexical_scores": self.lexical[["seed", "latent", "shared_count", "balanced_accuracy", "auroc"]]
            .to_dict(orient="list"),
            "llm_scores": (self.llm[["seed", "latent", "shared_count", "explanation", "balanced_accuracy", "auroc",
                                     "balanced_accuracy_at_zero"]].to_dict(orient="records") if self.llm is not None else []),
        }


def orphan_study(family: FinishedFamily, a: int, b: int, settings: interp.ContextSettings, llm: LLMSettings,
                 definition: str = "threshold", threshold: float = 0.7, high: float = 0.8, sample_seed: int = 0,
                 progress: bool = True) -> OrphanStudy:
    """Score seeds `a` and `b` (indices into the family) and pair them (see the module docstring)."""
    fm = family.matching
    counts = fm.shared_counts(definition, threshold)
    contexts = interp.heldout_contexts(family.cache, settings.ctx_len)
    t0 = time.time()
    lexical = [explainers.LexicalExplainer(), explainers.RuleScorer()]
    lex_a = interp.score_seed(family, a, contexts, None, *lexical, settings, counts, batch_latents=128)
    lex_b = interp.score_seed(family, b, contexts, None, *lexical, settings, counts, batch_latents=128)
    lexical_s = time.time() - t0
    result = fm.result(a, b)
    partner = result.dec_partner
    alignment = interp.pair_alignment(family.directions[a], family.directions[b], partner)
    shared_ab = shared_masks(result, threshold)[definition]
    lex_pairs = interp.matched_pairs(lex_a, lex_b, partner, alignment, shared_ab)
    pipelines: dict[str, Any] = {"lexical": {"explainer": lexical[0].config(), "scorer": lexical[1].config(),
                                             "seconds": lexical_s}}
    eligible = (lex_a.status == "ok").to_numpy()
    sample = interp.stratified_sample(counts[a], llm.per_count, eligible=eligible, seed=sample_seed)
    if llm.max_latents is not None:
        sample = np.sort(np.random.default_rng(sample_seed).permutation(sample)[:llm.max_latents])
    llm_all = llm_pairs = None
    llm_s = 0.0
    if llm.pipeline != "none" and len(sample):
        llm_settings = interp.ContextSettings(ctx_len=settings.ctx_len, n_explain=settings.n_explain,
                                              n_score_pos=llm.n_score_pos, n_score_neg=llm.n_score_neg,
                                              n_train_neg=settings.n_train_neg,
                                              min_score_pos=min(settings.min_score_pos, llm.n_score_pos), seed=sample_seed)
        explainer, scorer = explainers.make_pipeline(llm.pipeline, model_name=llm.model, device=family.spec.device,
                                                     dtype=llm.dtype, batch_size=llm.batch_size, base_url=llm.base_url,
                                                     endpoint_model=llm.endpoint_model, max_new_tokens=llm.max_new_tokens,
                                                     n_calibration=llm.n_calibration)
        t0 = time.time()
        llm_a = interp.score_seed(family, a, contexts, sample, explainer, scorer, llm_settings, counts)
        llm_b = interp.score_seed(family, b, contexts, partner[sample], explainer, scorer, llm_settings, counts)
        llm_s = time.time() - t0
        llm_pairs = interp.matched_pairs(llm_a, llm_b, partner, alignment, shared_ab)
        llm_all = pd.concat([llm_a, llm_b], ignore_index=True)
        n_prompts = int((llm_all.n_pos + llm_all.n_neg).sum() + 2 * llm.n_calibration * llm_all.status.eq("ok").sum())
        pipelines["llm"] = {"explainer": explainer.config(), "scorer": scorer.config(), "explainer_name": explainer.name,
                            "scorer_name": scorer.name, "seconds": llm_s, "latents": int(len(llm_all)),
                            # from the rows' own timings (recorded when each was computed), so a rerun that loads
                            # cached rows still reports what explaining and scoring a latent costs
                            "seconds_per_latent": float((llm_all.explain_s + llm_all.score_s).sum()) / max(len(llm_all), 1),
                            "scoring_prompts_approx": n_prompts}
    return OrphanStudy((family.spec.seeds[a], family.spec.seeds[b]), fm.n_seeds - 1, definition, threshold, high, contexts,
                       counts, pd.concat([lex_a, lex_b], ignore_index=True), lex_pairs, lexical_s, sample, llm_all, llm_pairs,
                       llm_s, pipelines)
