"""Shared test fixtures: an isolated cache dir, the shipped photos, a random checkpoint; no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import helpers

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


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A bare state dict of a randomly initialised model with helpers.N_CLASSES classes, saved
    once per session."""
    import torch

    from deeplab_cli.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random3.pth"
    torch.save(build_model(n_classes=helpers.N_CLASSES).state_dict(), path)
    return path


@pytest.fixture
def voc(tmp_path) -> Path:
    """A VOC2012-style folder of helpers.LABELS: a JPEG and a palette PNG each, the val split."""
    return helpers.write_voc(tmp_path / "VOC2012", helpers.LABELS)


@pytest.fixture
def server(monkeypatch):
    """A loopback HTTP server that weights downloads are pointed at (DEEPLAB_WEIGHTS_URL)."""
    from deeplab_cli.weights import URL_ENV

    srv = helpers.Server()
    monkeypatch.setenv(URL_ENV, srv.url)
    yield srv
    srv.close()
