"""Activations produced on the fly, for training without a disk cache (the paper's 8B tokens do not fit one).

`ActivationStream` runs the model once per chunk of token windows and hands out batches of activation rows
in a fixed order:

- the windows are those of the corpus's train split, in order, cycling with repeats when exhausted;
- with `buffer_tokens = 0` a batch is the next `batch_size` rows: with the same windows and chunking as
  `build_activation_cache`, they equal the cached rows bit for bit on CPU;
- with a shuffle buffer (as sparsify's and SAELens' activation stores), the buffer holds `buffer_tokens`
  rows from many documents; step s takes the rows at `default_rng([data_seed, s]).choice(buffer, batch)`
  and refills those slots with the next rows. The order is a function of `data_seed` alone, never of an
  SAE's seed, so every SAE of a family (every seed) trains on the same batches.

`state()` / `load_state()` hold everything needed to continue exactly where a run stopped (the step, the
next window, the pending rows and the buffer); `sae.training` saves it beside the SAEs' resume states.
Each row carries an id (its global position: window count × kept positions per window + offset), which
the batch hashes cover.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path
from .activations import hook_rows, parse_hook

STATE_FILE = "stream_state.npz"


class ActivationStream:
    """Batches of one hook's activations, produced by `model` from `windows` on demand (read in order)."""

    def __init__(self, model: Any, windows: np.ndarray, hook: str, *, batch_size: int, skip_positions: int = 1,
                 data_seed: int = 0, buffer_tokens: int = 0, batch_seqs: int = 16, store_dtype: str = "float16",
                 device: str | torch.device = "cpu"):
        parse_hook(hook)                  # the clear error for an unsupported hook
        windows = np.asarray(windows, np.int64)
        if windows.ndim != 2 or len(windows) == 0:
            raise ValueError(f"windows must be a non-empty [n_windows, seq_len] array, got shape {windows.shape}")
        if not 0 <= skip_positions < windows.shape[1]:
            raise ValueError(f"skip_positions {skip_positions} must be below the window length {windows.shape[1]}")
        if batch_size <= 0 or batch_seqs <= 0:
            raise ValueError(f"batch_size and batch_seqs must be positive, got {batch_size} and {batch_seqs}")
        if buffer_tokens and buffer_tokens < batch_size:
            raise ValueError(f"a shuffle buffer of {buffer_tokens} tokens cannot give batches of {batch_size}; "
                             f"use buffer_tokens >= batch_size, or 0 to turn it off")
        self.model, self.windows, self.hook = model, windows, hook
        self.skip, self.per_seq = int(skip_positions), windows.shape[1] - int(skip_positions)
        self.batch_size, self.data_seed = int(batch_size), int(data_seed)
        self.buffer_tokens, self.batch_seqs = int(buffer_tokens), int(batch_seqs)
        self.store = np.dtype(store_dtype)
        self.device = torch.device(device)
        self.d_model = int(model.cfg.d_model)
        self.step = 0
        self.next_window = 0
        self.forward_passes = 0
        self._pending = (np.empty((0, self.d_model), self.store), np.empty(0, np.int64))
        self._buffer = (np.empty((0, self.d_model), self.store), np.empty(0, np.int64))

    # -- identity and state -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What the batch order depends on (a resume state from another stream is refused)."""
        h = hashlib.sha256(self.windows.tobytes())
        h.update(repr((self.hook, self.skip, self.batch_size, self.data_seed, self.buffer_tokens, self.batch_seqs,
                       self.store.name)).encode())
        return h.hexdigest()[:16]

    def state(self) -> dict[str, np.ndarray]:
        return {"fingerprint": np.array(self.fingerprint()), "step": np.array(self.step),
                "next_window": np.array(self.next_window), "pending_rows": self._pending[0],
                "pending_ids": self._pending[1], "buffer_rows": self._buffer[0], "buffer_ids": self._buffer[1]}

    def load_state(self, state: dict[str, Any]) -> None:
        if str(state["fingerprint"]) != self.fingerprint():
            raise ValueError("the saved stream state belongs to another stream (windows, hook, batch size, data seed "
                             "or buffer differ); delete it to start over")
        self.step, self.next_window = int(state["step"]), int(state["next_window"])
        self._pending = (np.asarray(state["pending_rows"], self.store), np.asarray(state["pending_ids"], np.int64))
        self._buffer = (np.asarray(state["buffer_rows"], self.store), np.asarray(state["buffer_ids"], np.int64))

    def save(self, folder: Path | str) -> Path:
        """Write the state atomically to `<folder>/stream_state.npz`."""
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **self.state())
        return path

    def restore(self, folder: Path | str) -> bool:
        """Load `<folder>/stream_state.npz` if it exists (True when loaded)."""
        path = Path(folder) / STATE_FILE
        if not path.exists():
            return False
        with np.load(path) as state:
            self.load_state(dict(state))
        return True

    # -- producing rows ---------------------------------------------------------------------------
    def _produce(self) -> None:
        """One forward pass over the next `batch_seqs` windows (cycling): append their rows to the pending queue."""
        n = len(self.windows)
        count = np.arange(self.next_window, self.next_window + self.batch_seqs)
        batch = torch.from_numpy(self.windows[count % n]).to(self.device)
        with torch.inference_mode():
            rows = hook_rows(self.model, batch, [self.hook], self.skip, self.store,
                             where=f"windows {count[0]}..{count[-1]}", remedy="stream with store_dtype='float32'")[self.hook]
        ids = (count[:, None] * self.per_seq + np.arange(self.per_seq)[None, :]).reshape(-1)
        self._pending = (np.concatenate([self._pending[0], rows]), np.concatenate([self._pending[1], ids]))
        self.next_window += self.batch_seqs
        self.forward_passes += 1

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self._pending[1]) < n:
            self._produce()
        rows, ids = self._pending
        self._pending = (rows[n:], ids[n:])
        return ids[:n], rows[:n]

    def next_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, rows `[batch_size, d_model]`) of step `step`; steps are read in order."""
        if step != self.step:
            raise ValueError(f"a stream is read in order: step {step} was asked for, the stream is at step {self.step} "
                             f"(resume from its saved state)")
        if not self.buffer_tokens:
            ids, rows = self._take(self.batch_size)
        else:
            missing = self.buffer_tokens - len(self._buffer[1])
            if missing > 0:                              # first use: fill the buffer
                new_ids, new_rows = self._take(missing)
                self._buffer = (np.concatenate([self._buffer[0], new_rows]), np.concatenate([self._buffer[1], new_ids]))
            pos = np.sort(np.random.default_rng([self.data_seed, step]).choice(self.buffer_tokens, self.batch_size,
                                                                               replace=False))
            buf_rows, buf_ids = self._buffer
            ids, rows = buf_ids[pos].copy(), buf_rows[pos].copy()
            new_ids, new_rows = self._take(self.batch_size)
            buf_rows[pos], buf_ids[pos] = new_rows, new_ids
        self.step += 1
        return ids, rows
