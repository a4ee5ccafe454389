"""Shared test fixtures: an isolated cache dir, the shipped photos, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))


@pytest.fixture(autouse=True)
def deeplab_home(tmp_path_factory, monkeypatch):
    """Point the weights cache at an empty tmp dir, so no test sees the user's cache."""
    home = tmp_path_factory.mktemp("deeplab_home")
    monkeypatch.setenv("DEEPLAB_HOME", str(home))
    return home


@pytest.fixture
def data_dir() -> Path:
    return DATA


def load_photo(name: str) -> np.ndarray:
    """A shipped photo as RGB uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(DATA / name) as im:
        return np.asarray(im.convert("RGB"))
