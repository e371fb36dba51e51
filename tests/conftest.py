from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import patchwire.client as pw
from patchwire.service import PatchwireServer

from _datasets import make_pymia_dataset
from _servers import server_in_thread


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 subjects of 20x24x16, images (T1, T2), labels (GT), mask (MASK), written by pymia."""
    return make_pymia_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vary_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_h5 but subject i has 20 + 2i slices: subjects differ in shape."""
    return make_pymia_dataset(tmp_path_factory.mktemp("vary"), vary_shape=True, seed=7)


@pytest.fixture(scope="session")
def server(tiny_h5: Path, vary_h5: Path) -> Iterator[PatchwireServer]:
    with server_in_thread({"tiny": tiny_h5, "vary": vary_h5}) as srv:
        yield srv


@pytest.fixture
def client(server: PatchwireServer) -> Iterator[pw.Client]:
    with pw.connect(server.address) as c:
        yield c
