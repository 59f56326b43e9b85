"""Shared fixtures: an isolated data folder for caches, and the embedded model loaded once."""
from __future__ import annotations

import pytest

from replication import paths


@pytest.fixture
def tmp_data(tmp_path, monkeypatch):
    """Point the activation/matching/checkpoint caches at a temporary folder.

    The converted embedded model and the tokenised corpus stay in the real `data/` so they
    are built once per machine.
    """
    for name in ("ACTIVATIONS_DIR", "MATCHINGS_DIR", "CHECKPOINTS_DIR"):
        monkeypatch.setattr(paths, name, tmp_path / name.lower())
    return tmp_path


@pytest.fixture(scope="session")
def smol_model():
    from replication.models import load_model

    return load_model("smollm2-135m", dtype="float32")
