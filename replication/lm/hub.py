"""What the `paper` profile needs from the Hugging Face Hub, checked before any work starts.

The paper trains on Pythia-160M and text streamed from the Pile. Where a network exists, a profile can
name a hub model (`model_name: EleutherAI/pythia-160m`) and a hub dataset as its corpus
(`corpus_sources: ["hub:monology/pile-uncopyrighted"]`, optionally `hub:<name>:<config>`): the corpus
module then streams that dataset's documents (`datasets.load_dataset(..., streaming=True)`) into the
same on-disk token corpus the embedded sources produce, so every later stage is unchanged.

Offline, `check_hub_inputs` fails at once with one message that lists every missing input (model and
dataset) and names the offline alternative (the `paper-embedded` profile), instead of a retry loop
deep inside a notebook.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

HUB_PREFIX = "hub:"


class HubUnavailableError(ConnectionError):
    """A hub model or dataset the settings name cannot be reached."""


def is_hub_source(source: str) -> bool:
    return str(source).startswith(HUB_PREFIX)


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """`hub:<dataset>[:<config>]` -> (dataset, config)."""
    if not is_hub_source(source):
        raise ValueError(f"not a hub corpus source: {source!r} (expected 'hub:<dataset>[:<config>]')")
    rest = source[len(HUB_PREFIX):]
    name, _, config = rest.partition(":")
    if not name or name.count("/") != 1:
        raise ValueError(f"hub corpus source {source!r}: expected 'hub:<owner>/<dataset>[:<config>]'")
    return name, (config or None)


def _probe(kind: str, name: str, timeout: float) -> str | None:
    """None when the hub answers for this model/dataset, else why not (one line)."""
    try:
        import huggingface_hub as hf
    except ImportError:
        return "the `huggingface_hub` package is not installed"
    info: Callable[..., Any] = hf.model_info if kind == "model" else hf.dataset_info
    try:
        info(name, timeout=timeout)
    except Exception as err:  # noqa: BLE001 -- any failure means "not reachable", and the reason is reported
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def check_hub_inputs(model_name: str, corpus_sources: Sequence[str] | None, embedded_models: Sequence[str],
                     timeout: float = 10.0, probe: Callable[[str, str, float], str | None] | None = None) -> None:
    """Raise `HubUnavailableError` naming every hub model/dataset of these settings that cannot be reached.

    Embedded models and embedded corpus sources need nothing; this returns at once for them. `probe` defaults to
    the module's `_probe`, looked up at call time (so a test can replace it)."""
    probe = probe or _probe
    wanted: list[tuple[str, str]] = []
    if model_name not in embedded_models:
        wanted.append(("model", model_name))
    for s in corpus_sources or ():
        if is_hub_source(s):
            wanted.append(("dataset", parse_hub_source(s)[0]))
    missing = [(kind, name, why) for kind, name in wanted if (why := probe(kind, name, timeout)) is not None]
    if missing:
        lines = "\n".join(f"  - {kind} '{name}' ({why})" for kind, name, why in missing)
        raise HubUnavailableError(
            "these settings need the Hugging Face Hub, which cannot be reached from this machine:\n" + lines +
            "\nOffline, run the same code paths on what ships here: PROFILE=paper-embedded (SmolLM2, the embedded "
            "corpus streamed with repeats, 2^15 latents), or set model_name to an embedded model "
            f"({', '.join(embedded_models)}) and corpus_sources to null.")


def hub_documents(source: str, text_field: str = "text", split: str = "train") -> Iterator[tuple[str, str]]:
    """(document id, text) of a hub dataset, streamed in the dataset's own order (no download of the whole)."""
    import datasets

    name, config = parse_hub_source(source)
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(ds):
        if text_field not in row:
            raise KeyError(f"hub dataset {name!r} has no field {text_field!r} (fields: {sorted(row)})")
        yield f"{name}/{i}", row[text_field]
