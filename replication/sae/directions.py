"""The common currency between SAE checkpoints and matching: latent directions.

Whatever library wrote an SAE, matching only needs its encoder and decoder directions,
one row per latent (`[n_latents, d_in]`). Readers in `checkpoints` return this type.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LatentDirections:
    """Encoder and decoder directions of one SAE, rows = latents, shape `[n_latents, d_in]`.

    `name` is for display; `content_hash` identifies the weights (matching caches key on it);
    `meta` carries anything else the reader knew (architecture, k, seed, ...).
    """

    encoder: np.ndarray
    decoder: np.ndarray
    name: str = ""
    content_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.encoder = np.asarray(self.encoder, dtype=np.float32)
        self.decoder = np.asarray(self.decoder, dtype=np.float32)
        if self.encoder.ndim != 2 or self.decoder.ndim != 2:
            raise ValueError(
                f"latent directions must be 2-D [n_latents, d_in]; got encoder {self.encoder.shape}, "
                f"decoder {self.decoder.shape}"
            )
        if self.encoder.shape != self.decoder.shape:
            raise ValueError(
                f"encoder and decoder directions differ in shape: {self.encoder.shape} vs {self.decoder.shape}"
            )
        if not self.content_hash:

            digest = hashlib.sha256()
            digest.update(np.ascontiguousarray(self.encoder).tobytes())
            digest.update(np.ascontiguousarray(self.decoder).tobytes())
            self.content_hash = digest.hexdigest()[:16]

    @property
    def n_latents(self) -> int:
        return int(self.encoder.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.encoder.shape[1])
