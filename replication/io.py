"""Atomic, hashed file I/O shared by every cache in the project.

Every cache file is written to a temporary name in the same folder and renamed into
place, so a killed run never leaves a half-written file that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path | str, obj: Any, strict: bool = False) -> None:
    """Write `obj` as indented JSON to `path` atomically (numpy scalars/arrays allowed).

    With `strict`, NaN and infinities become `null` so that the file is standard JSON that
    jq, JavaScript and other strict readers accept (Python's default writes bare `NaN`).
    """
    if strict:
        obj = json_safe(obj)
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=not strict)
    write_bytes_atomic(path, (text + "\n").encode())


def json_safe(obj: Any) -> Any:
    """Return `obj` with numpy values made plain and every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        return json_safe(_json_default(obj))        # the one numpy -> Python conversion
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def read_json(path: Path | str) -> Any:
    """Read JSON, with an error that names the file if it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt JSON file {path}: {err}") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex SHA-256 of a bytes-like object."""
    return hashlib.sha256(data).hexdigest()


def settings_key(settings: dict[str, Any], length: int = 12) -> str:
    """Short stable hash of a settings dict (sorted JSON), for cache folder names."""
    blob = json.dumps(settings, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
