"""Explainers and detection scorers for `replication.interpretability` (Figure 6 / Table 1).

An *explainer* turns a latent's top-activating contexts into an `Explanation`; a *scorer*
predicts, for held-out contexts it is given with the explanation, whether each makes the latent
fire (a yes/no decision plus a continuous score for AUROC). Both are small objects with
`name`, `config()` (what goes into cache keys and figure JSON) and one batched method:

* `LexicalExplainer` + `RuleScorer`: a transparent baseline that needs no language model. The
  explanation is the set of tokens (or one token class) that dominate the activating tokens of
  the top contexts, chosen to separate them from non-activating contexts the explainer was
  given; the scorer applies that rule literally.
* `LLMExplainer` / `LLMScorer` over a chat backend: `LocalChatModel` (the embedded
  SmolLM2-135M-Instruct, run with `transformers`; its scorer compares the logits of "Yes" and
  "No") or `OpenAICompatibleChat` (any `/v1/chat/completions` endpoint by URL and model name,
  e.g. a served Llama-3.1-70B as in the paper; plain `urllib`, no new dependency).
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .interpretability import LatentExamples

Decode = Callable[[int], str]


@dataclass
class Explanation:
    """A latent's explanation: text for any scorer, and an executable rule for `RuleScorer`."""

    latent: int
    text: str
    rule: dict[str, Any] | None = None


# --------------------------------------------------------------------------- lexical baseline
def token_key(piece: str) -> str:
    """Normalised token: stripped and lower-cased; whitespace-only tokens keep their text."""
    stripped = piece.strip()
    return stripped.lower() if stripped else piece


TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    "digits": lambda s: bool(s.strip()) and any(c.isdigit() for c in s) and all(c.isdigit() or c in ".,-" for c in s.strip()),
    "punctuation": lambda s: bool(s.strip()) and not any(c.isalnum() for c in s),
    "line break": lambda s: "\n" in s,
    "capitalised word": lambda s: s.strip().isalpha() and s.strip()[0].isupper(),
    "word continuation (no leading space)": lambda s: s.isalpha() and s.islower(),
    "code-like (_ or brackets)": lambda s: any(c in s for c in "_()[]{}<>=:;"),
}


CLASS_NAMES = tuple(TOKEN_CLASSES)


class TokenTable:
    """Per-token-id normalised key and token-class bitmask, filled lazily from a decode function,
    so rules are applied to whole `[n, ctx_len]` token arrays with numpy lookups."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.key_of = np.full(0, -1, np.int64)
        self.cls_of = np.zeros(0, np.int64)
        self.keys: list[str] = []
        self.key_index: dict[str, int] = {}

    def _grow(self, tokens: np.ndarray) -> None:
        top = int(tokens.max(initial=-1)) + 1
        if top > len(self.key_of):
            self.key_of = np.concatenate([self.key_of, np.full(top - len(self.key_of), -1, np.int64)])
            self.cls_of = np.concatenate([self.cls_of, np.zeros(top - len(self.cls_of), np.int64)])
        for t in np.unique(tokens):
            if self.key_of[t] < 0:
                piece = self.decode(int(t))
                self.key_of[t] = self.key_id(token_key(piece), create=True)
                self.cls_of[t] = sum(1 << i for i, f in enumerate(TOKEN_CLASSES.values()) if f(piece))

    def key_id(self, key: str, create: bool = False) -> int:
        if key not in self.key_index:
            if not create:
                return -2                      # a key never seen matches nothing
            self.key_index[key] = len(self.keys)
            self.keys.append(key)
        return self.key_index[key]

    def lookup(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(key ids, class bitmasks) of a token-id array, same shape."""
        tokens = np.asarray(tokens, np.int64)
        self._grow(tokens)
        return self.key_of[tokens], self.cls_of[tokens]

    def count_matches(self, rule: dict[str, Any], tokens: np.ndarray) -> np.ndarray:
        """Matched tokens per context (row) of `tokens` under a lexical rule."""
        unknown = [c for c in rule.get("classes", ()) if c not in TOKEN_CLASSES]
        if unknown:
            raise ValueError(f"unknown token class(es) {unknown}; known: {sorted(TOKEN_CLASSES)}")
        keys, cls = self.lookup(tokens)
        ids = [self.key_id(k) for k in rule.get("tokens", ())]
        mask = sum(1 << CLASS_NAMES.index(c) for c in rule.get("classes", ()))
        hit = np.isin(keys, ids) | ((cls & mask) != 0)
        return hit.reshape(len(tokens), -1).sum(1).astype(np.float64)


_TABLES: dict[int, tuple[Decode, TokenTable]] = {}


def token_table(decode: Decode) -> TokenTable:
    """The (shared) `TokenTable` of a decode function."""
    if id(decode) not in _TABLES or _TABLES[id(decode)][0] is not decode:
        _TABLES[id(decode)] = (decode, TokenTable(decode))
    return _TABLES[id(decode)][1]


def apply_rule(rule: dict[str, Any], contexts: Sequence[Sequence[str]]) -> np.ndarray:
    """Number of tokens per context (given as token strings) matched by a lexical rule."""
    unknown = [c for c in rule.get("classes", ()) if c not in TOKEN_CLASSES]
    if unknown:
        raise ValueError(f"unknown token class(es) {unknown}; known: {sorted(TOKEN_CLASSES)}")
    keys, classes = set(rule.get("tokens", ())), rule.get("classes", ())
    return np.array([sum(1 for p in ctx if token_key(p) in keys or any(TOKEN_CLASSES[c](p) for c in classes))
                     for ctx in contexts], dtype=np.float64)


def describe_rule(rule: dict[str, Any]) -> str:
    """Plain-English text of a lexical rule (what any text scorer would be given)."""
    parts = []
    if rule.get("tokens"):
        parts.append("the token" + ("s " if len(rule["tokens"]) > 1 else " ") + ", ".join(json.dumps(t) for t in rule["tokens"]))
    if rule.get("classes"):
        parts.append("tokens of class " + ", ".join(rule["classes"]))
    return "fires on " + " or ".join(parts) if parts else "fires on nothing recognisable"


class LexicalExplainer:
    """Tokens (or a token class) that dominate the activating tokens of the top contexts.

    Candidates: the first m (m <= `max_tokens`) activating token keys ranked by summed
    activation, and each token class. The candidate with the best balanced accuracy at
    telling the shown top contexts from the shown non-activating contexts wins (ties: fewer
    tokens). Deterministic and instant; a floor any language-model explainer should beat.
    """

    name = "lexical"

    def __init__(self, max_tokens: int = 5, use_classes: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
        self.max_tokens, self.use_classes = int(max_tokens), bool(use_classes)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "max_tokens": self.max_tokens, "use_classes": self.use_classes}

    def explain(self, examples: Sequence[LatentExamples]) -> list[Explanation]:
        return [self._one(ex) for ex in examples]

    def _one(self, ex: LatentExamples) -> Explanation:
        table = token_table(ex.decode)
        keys, _ = table.lookup(ex.tokens)
        active = ex.acts > 0
        weight = np.bincount(keys[active], weights=ex.acts[active], minlength=len(table.keys))
        order = np.argsort(-weight, kind="stable")
        ranked = [table.keys[i] for i in order[: self.max_tokens] if weight[i] > 0]
        candidates = [{"tokens": ranked[:m], "classes": []} for m in range(1, len(ranked) + 1)]
        if self.use_classes:
            candidates += [{"tokens": [], "classes": [c]} for c in TOKEN_CLASSES]
        best, best_score = {"tokens": [], "classes": []}, -1.0
        for rule in candidates:
            tpr = float((table.count_matches(rule, ex.tokens) > 0).mean())
            tnr = float((table.count_matches(rule, ex.neg_tokens) == 0).mean()) if len(ex.neg_tokens) else 0.5
            if 0.5 * (tpr + tnr) > best_score + 1e-12:
                best, best_score = rule, 0.5 * (tpr + tnr)
        rule = {**best, "fit_balanced_accuracy": best_score}
        return Explanation(ex.latent, describe_rule(rule), rule)


class RuleScorer:
    """Applies a `LexicalExplainer` rule directly: a context is predicted active if any token matches."""

    name = "rule"

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def score(self, explanations: Sequence[Explanation], contexts: Sequence[np.ndarray],
              decode: Decode, calibration: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        table = token_table(decode)
        out = []
        for e, toks in zip(explanations, contexts):
            if e.rule is None:
                raise ValueError(f"latent {e.latent}: RuleScorer needs an explanation with a rule (LexicalExplainer)")
            counts = table.count_matches(e.rule, np.asarray(toks))
            out.append((counts > 0, counts))
        return out


# --------------------------------------------------------------------------- prompts
PROMPT_VERSION = 2   # bump when a prompt template changes: it is part of the cache key of every LLM row
EXPLAIN_SYSTEM = "You are an expert at finding the pattern shared by highlighted words in text. Answer in one short phrase."
SCORE_SYSTEM = "Answer only Yes or No."


def highlight(pieces: Sequence[str], acts: np.ndarray) -> str:
    """Join token pieces, wrapping each run of activating tokens in << >>."""
    out, inside = [], False
    for piece, a in zip(pieces, acts):
        if a > 0 and not inside:
            out.append("<<")
            inside = True
        elif a <= 0 and inside:
            out.append(">>")
            inside = False
        out.append(piece)
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", " ")


def _marked_span(pieces: Sequence[str], acts: np.ndarray) -> str:
    """The run of activating tokens around the strongest one, as text."""
    peak = int(np.argmax(acts))
    lo, hi = peak, peak + 1
    while lo > 0 and acts[lo - 1] > 0:
        lo -= 1
    while hi < len(acts) and acts[hi] > 0:
        hi += 1
    return "".join(pieces[lo:hi]).strip() or repr("".join(pieces[lo:hi]))


def explain_messages(ex: LatentExamples, n_show: int | None = None) -> list[dict[str, str]]:
    """Chat prompt: the top contexts with activating tokens marked, plus the list of strongest
    marked spans (small models copy lists better than they read markup), asking for a short phrase."""
    strings, acts = ex.strings()[:n_show], ex.acts[:n_show]
    lines = [f"{i + 1}. {highlight(p, a)}" for i, (p, a) in enumerate(zip(strings, acts))]
    spans = list(dict.fromkeys(_marked_span(p, a) for p, a in zip(strings, acts)))
    user = ("Below are text snippets. In each, the words between << and >> make a hidden feature fire.\n\n"
            + "\n".join(lines) + "\n\nThe strongest marked words: " + "; ".join(spans) + "\n\n"
            "What do the marked words have in common? Answer with a short phrase.")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def score_messages(explanation: str, pieces: Sequence[str]) -> list[dict[str, str]]:
    """Chat prompt of detection scoring for one context."""
    text = "".join(pieces).replace("\n", " ")
    user = (f"Description: {explanation}\n\nText: \"{text}\"\n\n"
            "Does the text contain something that matches the description? Answer Yes or No.")
    return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def clean_explanation(text: str, max_chars: int = 200) -> str:
    """First non-empty line of a generated answer, without markup brackets, trimmed."""

    lines = [l.strip() for l in text.replace("<<", "").replace(">>", "").strip().splitlines() if l.strip()]
    out = lines[0] if lines else ""
    out = re.sub(r"^(the )?(hidden )?feature( in a few words)?( is)?\s*[:\-]?\s*", "", out, flags=re.I)
    return out.strip().strip("\"'").strip()[:max_chars].strip() or "(empty)"


def parse_yes_no(text: str) -> float:
    """+1 for an answer starting with yes, -1 for no, 0 when neither (counted as no)."""
    word = text.strip().lstrip("\"'*").lower()
    return 1.0 if word.startswith("yes") else -1.0 if word.startswith("no") else 0.0


# --------------------------------------------------------------------------- chat backends
class ChatBackend(Protocol):
    name: str

    def config(self) -> dict[str, Any]: ...

    def generate(self, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[str]: ...

    def yes_no(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray: ...


class LocalChatModel:
    """A local chat model through `transformers` (default: the embedded SmolLM2-135M-Instruct).

    `generate` is batched greedy decoding with left padding; `yes_no` returns, per conversation,
    log P(Yes-like) - log P(No-like) for the first assistant token (one forward pass, batched).
    """

    def __init__(self, model_name: str = "smollm2-135m", device: str | torch.device = "cpu",
                 dtype: str = "auto", batch_size: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..devices import resolve_device, resolve_dtype
        from ..lm.models import EMBEDDED_MODELS, convert_embedded

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device, "llm_dtype")

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        source = str(convert_embedded(model_name)) if model_name in EMBEDDED_MODELS else model_name
        self.model_name, self.dtype, self.batch_size = model_name, dtype, int(batch_size)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.name = f"local:{model_name}"
        self._yes = self._first_ids(["Yes", "yes", " Yes", " yes", "YES"])
        self._no = self._first_ids(["No", "no", " No", " no", "NO"])

    def _first_ids(self, words: Sequence[str]) -> list[int]:
        return sorted({self.tokenizer.encode(w, add_special_tokens=False)[0] for w in words})

    def config(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.model_name, "dtype": self.dtype}

    def _encode(self, conversations: Sequence[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def generate(self, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int = 32) -> list[str]:
        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            enc = self._encode(conversations[start:start + self.batch_size])
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    @torch.inference_mode()
    def yes_no(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
        scores = []
        for start in range(0, len(conversations), self.batch_size):
            enc = self._encode(conversations[start:start + self.batch_size])
            mask = enc["attention_mask"]
            position_ids = (mask.cumsum(1) - 1).clamp_min(0)
            logits = self.model(**enc, position_ids=position_ids).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            diff = torch.logsumexp(logp[:, self._yes], 1) - torch.logsumexp(logp[:, self._no], 1)
            scores.append(diff.cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)


class OpenAICompatibleChat:
    """Any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`), via `urllib`.

    `api_key` defaults to the environment variable `api_key_env` (none sent when unset).
    Requests are sequential with `retries` retries on network errors and HTTP 429/5xx.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 2, temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if not model:
            raise ValueError("model name is required for an OpenAI-compatible endpoint")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.timeout, self.retries, self.temperature = float(timeout), int(retries), float(temperature)
        self.name = f"openai:{model}"

    def config(self) -> dict[str, Any]:
        return {"backend": "openai-compatible", "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature}

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """One chat completion; returns the first choice's message content."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as err:
                if err.code not in (429, 500, 502, 503, 504) or attempt == self.retries:
                    raise RuntimeError(f"chat endpoint {url} answered HTTP {err.code}: {err.read()[:200]!r}") from err
            except urllib.error.URLError as err:
                if attempt == self.retries:
                    raise RuntimeError(f"chat endpoint {url} unreachable: {err.reason}") from err
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                raise RuntimeError(f"chat endpoint {url} returned an unexpected payload ({err!r})") from err
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def generate(self, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int = 64) -> list[str]:
        return [self.chat(c, max_new_tokens) for c in conversations]

    def yes_no(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
        return np.array([parse_yes_no(self.chat(c, 3)) for c in conversations], dtype=np.float64)


# --------------------------------------------------------------------------- LLM explainer and scorer
class LLMExplainer:
    """Explains a latent by prompting a chat backend with its top contexts (activating tokens marked)."""

    def __init__(self, backend: ChatBackend, max_new_tokens: int = 32, n_show: int | None = None) -> None:
        self.backend, self.max_new_tokens, self.n_show = backend, int(max_new_tokens), n_show
        self.name = f"llm[{backend.name}]"

    def config(self) -> dict[str, Any]:
        return {"name": "llm", **self.backend.config(), "max_new_tokens": self.max_new_tokens, "n_show": self.n_show,
                "system": EXPLAIN_SYSTEM, "prompt_version": PROMPT_VERSION}

    def explain(self, examples: Sequence[LatentExamples]) -> list[Explanation]:
        answers = self.backend.generate([explain_messages(ex, self.n_show) for ex in examples], self.max_new_tokens)
        return [Explanation(ex.latent, clean_explanation(a)) for ex, a in zip(examples, answers)]


def calibrated_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """Decision threshold with the best balanced accuracy on calibration scores (midpoints; ties: median)."""
    values = np.unique(np.r_[pos, neg])
    if len(values) < 2 or len(pos) == 0 or len(neg) == 0:
        return 0.0
    cuts = 0.5 * (values[1:] + values[:-1])
    ba = 0.5 * ((pos[None, :] > cuts[:, None]).mean(1) + (neg[None, :] <= cuts[:, None]).mean(1))
    return float(np.median(cuts[ba >= ba.max() - 1e-12]))


class LLMScorer:
    """Detection scoring by a chat backend: one yes/no question per (explanation, context).

    With `n_calibration > 0` the decision threshold on the backend's yes-vs-no score is fitted per
    latent on contexts the explainer already saw (its top contexts and its non-activating
    contexts), never on the scored ones; with 0, "yes" means yes (the paper's setting, where a
    70B scorer is well calibrated; a 135M one mostly says no).
    """

    def __init__(self, backend: ChatBackend, n_calibration: int = 0) -> None:
        self.backend, self.n_calibration = backend, int(n_calibration)
        self.name = f"detection[{backend.name}]" + (f"+cal{self.n_calibration}" if self.n_calibration else "")

    def config(self) -> dict[str, Any]:
        return {"name": "detection", **self.backend.config(), "system": SCORE_SYSTEM, "n_calibration": self.n_calibration,
                "prompt_version": PROMPT_VERSION}

    def score(self, explanations: Sequence[Explanation], contexts: Sequence[np.ndarray],
              decode: Decode, calibration: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        groups: list[np.ndarray] = []
        for i, (e, toks) in enumerate(zip(explanations, contexts)):
            groups.append(np.asarray(toks))
            if self.n_calibration and calibration is not None:
                pos, neg = calibration[i]
                groups += [np.asarray(pos)[: self.n_calibration], np.asarray(neg)[: self.n_calibration]]
        per_latent = len(groups) // max(len(explanations), 1)
        convs, sizes = [], []
        for g, toks in enumerate(groups):
            text = explanations[g // per_latent].text
            convs += [score_messages(text, [decode(int(t)) for t in row]) for row in toks]
            sizes.append(len(toks))
        flat, at, parts = self.backend.yes_no(convs), 0, []
        for n in sizes:
            parts.append(flat[at:at + n])
            at += n
        out = []
        for i in range(len(explanations)):
            s = parts[i * per_latent]
            threshold = calibrated_threshold(parts[i * per_latent + 1], parts[i * per_latent + 2]) if per_latent == 3 else 0.0
            out.append((s > threshold, s))
        return out


def make_pipeline(kind: str, model_name: str = "smollm2-135m", device: str | torch.device = "cpu",
                  dtype: str = "auto", batch_size: int = 16, base_url: str | None = None,
                  endpoint_model: str | None = None, max_new_tokens: int = 32, n_calibration: int = 0):
    """(explainer, scorer) by name: `lexical`, `local` (embedded chat model) or `openai` (needs URL + model)."""
    if kind == "lexical":
        return LexicalExplainer(), RuleScorer()
    if kind == "local":
        backend: ChatBackend = LocalChatModel(model_name, device=device, dtype=dtype, batch_size=batch_size)
    elif kind == "openai":
        if not base_url or not endpoint_model:
            raise ValueError("the 'openai' pipeline needs base_url and endpoint_model (an OpenAI-compatible server)")
        backend = OpenAICompatibleChat(base_url, endpoint_model)
    else:
        raise ValueError(f"unknown pipeline '{kind}'; choose 'lexical', 'local' or 'openai'")
    return LLMExplainer(backend, max_new_tokens=max_new_tokens), LLMScorer(backend, n_calibration=n_calibration)
