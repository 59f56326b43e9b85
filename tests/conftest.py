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
    from replication.lm.models import load_model

    return load_model("smollm2-135m", dtype="float32")


def smoke_numbers(name: str) -> dict:
    """The `numbers` of a smoke-profile figure JSON, after checking its PNG and PDF exist.

    Fails (never skips) when missing: `make test` runs nbval first, which writes them."""
    from replication.plotting import load_figure_json

    path = paths.figures_dir("smoke") / f"{name}.json"
    assert path.exists(), f"{path} missing: run `make nbval` (or `make figures PROFILE=smoke`) first"
    for ext in ("png", "pdf"):
        assert path.with_suffix(f".{ext}").stat().st_size > 0, f"{name}.{ext} is empty"
    return load_figure_json(name, "smoke")["numbers"]
