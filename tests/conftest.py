"""Fixtures every test folder may use: tiny pymia-format datasets written by pymia itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from _datasets import make_pymia_dataset


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 subjects of 20x24x16, images (T1, T2), labels (GT), mask (MASK), written by pymia."""
    return make_pymia_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vary_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_h5 but subject i has 20 + 2i slices: subjects differ in shape."""
    return make_pymia_dataset(tmp_path_factory.mktemp("vary"), vary_shape=True, seed=7)
