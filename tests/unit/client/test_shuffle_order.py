"""A shuffled DataLoader's order predicted for the read-ahead window, without a server: a fake datasource."""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as torch_data

from patchwire.client._readahead import ReadAhead
from patchwire.client._shuffle_order import ShuffleOrder
from patchwire.client.torch import PytorchDatasetAdapter

LENGTH = 37


class FakeStats:
    def untimed(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class FakeDatasource:
    """``LENGTH`` samples; a sample says whether the read-ahead thread fetched it (``ahead``)."""

    def __init__(self) -> None:
        self._spec = object()
        self.stats = FakeStats()

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_samples([index])[0]

    def get_samples(self, indices: list[int], seed: int = 0, epoch: int = 0, retry: Any = None) -> list[dict[str, Any]]:
        ahead = threading.current_thread().name == "patchwire-readahead"
        return [{"index": i, "values": np.full(3, i * 10, dtype=np.int64), "ahead": ahead} for i in indices]


def epoch(loader: torch_data.DataLoader[Any]) -> tuple[list[int], int, int]:
    """The indices delivered in order (each checked against a direct fetch), and the samples fetched ahead and
    directly."""
    order: list[int] = []
    ahead = 0
    for batch in loader:
        for index, values, was_ahead in zip(batch["index"], batch["values"], batch["ahead"], strict=True):
            assert values.tolist() == FakeDatasource().get_samples([int(index)])[0]["values"].tolist()
            order.append(int(index))
            ahead += int(was_ahead)
    return order, ahead, len(order) - ahead


def sampler_order(loader: torch_data.DataLoader[Any], state: torch.Tensor) -> list[int]:
    """What the loader's sampler yields from the default generator's ``state`` (as the loader's iterator would:
    the base seed drawn first)."""
    saved = torch.random.get_rng_state()
    try:
        torch.random.set_rng_state(state)
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        return list(loader.sampler)  # type: ignore[arg-type]
    finally:
        torch.random.set_rng_state(saved)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("own_generator", [False, True])
def test_shuffled_epochs_deliver_the_samplers_order_mostly_fetched_ahead(workers: int, own_generator: bool) -> None:
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(5) if own_generator else None
    adapter = PytorchDatasetAdapter(FakeDatasource())  # type: ignore[arg-type]
    loader = torch_data.DataLoader(adapter, batch_size=2, shuffle=True, num_workers=workers, generator=generator)
    for _ in range(2):
        state = torch.random.get_rng_state()
        expected = sampler_order(loader, state) if generator is None else None
        generator_state = generator.get_state() if generator is not None else None
        order, ahead, direct = epoch(loader)
        if generator is not None:
            assert generator_state is not None
            replay = torch.Generator()
            replay.set_state(generator_state)
            torch.empty((), dtype=torch.int64).random_(generator=replay)
            expected = torch.randperm(LENGTH, generator=replay).tolist()
        assert order == expected
        assert sorted(order) == list(range(LENGTH))
        # each process fetches its first batch directly (and, with workers, none of its last ones ahead late)
        assert direct <= 2 * max(1, workers), (ahead, direct)
        assert ahead >= LENGTH - 2 * max(1, workers)


def test_workers_of_a_loader_that_does_not_shuffle_fetch_ahead_from_their_first_batch() -> None:
    adapter = PytorchDatasetAdapter(FakeDatasource())  # type: ignore[arg-type]
    loader = torch_data.DataLoader(adapter, batch_size=2, num_workers=2)
    order, ahead, direct = epoch(loader)
    assert order == list(range(LENGTH))
    assert direct <= 4 and ahead >= LENGTH - 4, (ahead, direct)  # each worker's first batch only, then predicted


def test_a_sequential_batch_is_predicted_only_in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    shuffle = ShuffleOrder()
    assert shuffle.predict((4, 5), LENGTH) is None, "the main process keeps to the step it sees"
    info = SimpleNamespace(num_workers=3, id=1)
    monkeypatch.setattr(torch_data, "get_worker_info", lambda: info)
    plan = shuffle.predict((2, 3), LENGTH)
    assert plan is not None and list(plan)[:2] == [(8, 9), (14, 15)]
    assert shuffle.predict((3, 4), LENGTH) is None  # not aligned to the batch size
    assert shuffle.predict((2, 4), LENGTH) is None  # not consecutive
    last = shuffle.predict((0, 1, 2), 7)
    assert last is not None and list(last) == [], "nothing after the end"


def test_without_read_ahead_nothing_is_predicted() -> None:
    torch.manual_seed(2)
    adapter = PytorchDatasetAdapter(FakeDatasource(), read_ahead=False)  # type: ignore[arg-type]
    loader = torch_data.DataLoader(adapter, batch_size=2, shuffle=True)
    order, ahead, _ = epoch(loader)
    assert sorted(order) == list(range(LENGTH)) and ahead == 0


def test_a_custom_sampler_is_served_directly_in_its_order() -> None:
    torch.manual_seed(3)
    adapter = PytorchDatasetAdapter(FakeDatasource())  # type: ignore[arg-type]
    indices = np.random.default_rng(0).permutation(LENGTH).tolist()
    loader = torch_data.DataLoader(adapter, batch_size=2, sampler=indices)
    order, ahead, _ = epoch(loader)
    assert order == indices and ahead == 0


def test_predict_finds_an_aligned_batch_of_a_snapshot_only() -> None:
    torch.manual_seed(4)
    shuffle = ShuffleOrder()
    shuffle.observe()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    order = torch.randperm(LENGTH, generator=torch.Generator().manual_seed(seed)).tolist()
    plan = shuffle.predict((order[4], order[5]), LENGTH)
    assert plan is not None and list(plan) == [tuple(order[s : s + 2]) for s in range(6, LENGTH, 2)]
    assert shuffle.predict((order[5], order[6]), LENGTH) is None  # not aligned to the batch size
    assert shuffle.predict((order[1], order[0]), LENGTH) is None
    assert shuffle.predict((LENGTH,), LENGTH) is None
    copy = pickle.loads(pickle.dumps(shuffle))
    assert copy.predict((order[0], order[1]), LENGTH) is not None


class Fetch:
    def __init__(self) -> None:
        self.ahead: list[list[int]] = []
        self.direct: list[list[int]] = []

    def __call__(self, indices: list[int]) -> list[int]:
        is_ahead = threading.current_thread().name == "patchwire-readahead"
        (self.ahead if is_ahead else self.direct).append(list(indices))
        return [i * 10 for i in indices]


def test_a_wrong_prediction_is_cancelled_and_the_requests_fetched_directly() -> None:
    fetch = Fetch()
    predicted = [(4, 9), (1, 7), (3, 2), (8, 0)]
    asked: list[tuple[int, ...]] = []

    def predict(request: tuple[int, ...]) -> Iterator[tuple[int, ...]] | None:
        asked.append(request)
        return iter(predicted) if request == (5, 6) else None

    window = ReadAhead(fetch, 10, size=lambda _: 4, max_samples=4, predict=predict)
    assert window.get([5, 6]) == [50, 60]
    assert window.get([4, 9]) == [40, 90]  # as predicted
    assert window.get([3, 2]) == [30, 20]  # not the predicted (1, 7): fetched directly, the prediction dropped
    assert window.get([1, 7]) == [10, 70]
    assert window.ahead == []
    window.stop()
    assert asked == [(5, 6), (3, 2), (1, 7)]
    assert fetch.direct == [[5, 6], [3, 2], [1, 7]]
    assert [4, 9] in [b[:2] for b in fetch.ahead]


def test_persistent_workers_get_their_later_epochs_right_unpredicted() -> None:
    orders: dict[bool, list[list[int]]] = {}
    for read_ahead in (False, True):
        torch.manual_seed(6)
        adapter = PytorchDatasetAdapter(FakeDatasource(), read_ahead=read_ahead)  # type: ignore[arg-type]
        loader = torch_data.DataLoader(adapter, batch_size=2, shuffle=True, num_workers=2, persistent_workers=True)
        orders[read_ahead] = [epoch(loader)[0] for _ in range(3)]
    assert orders[True] == orders[False]
