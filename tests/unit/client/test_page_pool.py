"""The client's page pool: payload buffers whose pages are recycled once no view of them is left, within a bound,
and moved between sizes without copies."""

from __future__ import annotations

import os

import numpy as np
import pytest

from patchwire.client import _page_pool, _pages


def test_a_pooled_buffer_comes_back_only_when_its_last_view_is_gone() -> None:
    pool = _page_pool.PagePool()
    first = pool.take(1 << 20)
    address = first.ctypes.data
    view = first.view(np.float32).reshape(512, 512)[1:]  # a view of a view, as decoding and torch make them
    del first
    assert pool.take(1 << 20).ctypes.data != address  # the view still holds it
    assert pool.recycled == 0
    del view
    again = pool.take(1 << 20)
    assert again.ctypes.data == address and pool.recycled == 1
    assert again.flags.writeable and again.nbytes == 1 << 20
    assert pool.take(1 << 10).nbytes == 1 << 10  # other sizes get their own buffers


def test_the_pool_keeps_at_most_max_bytes_of_free_buffers() -> None:
    pool = _page_pool.PagePool(max_bytes=3 << 20)
    taken = [pool.take(1 << 20) for _ in range(5)]
    del taken
    again = [pool.take(1 << 20) for _ in range(5)]
    assert len(again) == 5 and pool.recycled == 3


def test_free_buffers_of_one_size_make_up_a_buffer_of_another() -> None:
    """Pages move between sizes (batches of slices leave pages a batch of patches reuses), without copies."""
    if not _pages.available():
        pytest.skip("moving pages needs Linux mremap")
    pool = _page_pool.PagePool()
    a, b, c = (pool.take(1 << 20) for _ in range(3))
    a[:], b[:], c[:] = 1, 2, 3
    del a
    del b
    del c
    assert pool.free_bytes == 3 << 20
    big = pool.take(5 << 20)
    assert pool.recycled == 1 and pool.recycled_bytes == 3 << 20 and pool.free_bytes == 0
    # the recycled pages come first, moved as they were (the most recently freed first); the rest are fresh
    assert [int(big[k << 20]) for k in range(3)] == [3, 2, 1]
    big[:] = 7
    assert int(big.sum()) == 7 * (5 << 20)
    address = big.ctypes.data
    del big
    assert pool.free_bytes == 5 << 20
    again = pool.take((2 << 20) + 100)  # a free buffer that is large enough is used in place, its rest stays free
    assert again.ctypes.data == address and again.nbytes == (2 << 20) + 100
    assert pool.recycled_bytes == (3 << 20) + (2 << 20) + _pages.PAGE
    assert pool.free_bytes == (5 << 20) - (2 << 20) - _pages.PAGE
    rest = pool.take((3 << 20) - _pages.PAGE)
    assert rest.ctypes.data == address + (2 << 20) + _pages.PAGE and pool.free_bytes == 0
    again[:] = 1
    rest[:] = 2
    assert int(again.sum()) == again.nbytes and int(rest.sum()) == 2 * rest.nbytes


def test_a_reserve_is_mapped_ahead_and_a_forked_child_starts_empty() -> None:
    if not _pages.available():
        pytest.skip("moving pages needs Linux mremap")
    pool = _page_pool.PagePool(max_bytes=6 << 20)
    pool.reserve(8 << 20)
    assert pool.free_bytes == 6 << 20  # never beyond max_bytes
    held = pool.take(4 << 20)
    assert pool.recycled_bytes == 4 << 20
    pid = os.fork()
    if pid == 0:  # the child: inherited free pages are unmapped, a held buffer stays usable
        pool._after_fork()
        held[:] = 1
        os._exit(0 if pool.free_bytes == 0 and int(held.sum()) == 4 << 20 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.free_bytes == 2 << 20


def test_buffers_of_mixed_sizes_never_share_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random takes and releases of mixed sizes (splitting and moving free pages all the time): every live buffer
    keeps what was written into it, and the free pages stay within the bound."""
    if not _pages.available():
        pytest.skip("moving pages needs Linux mremap")
    moves = []
    real_move = _pages.move
    monkeypatch.setattr(_pages, "move", lambda seg, dst: (moves.append(seg), real_move(seg, dst)))
    rng = np.random.default_rng(0)
    pool = _page_pool.PagePool(max_bytes=24 << 20)
    live: dict[int, np.ndarray] = {}
    for step in range(300):
        if live and (len(live) >= 5 or rng.random() < 0.4):
            del live[int(rng.choice(list(live)))]
        else:
            buf = pool.take(int(rng.integers(1 << 20, 7 << 20)))
            buf[:] = step % 251
            live[step % 251] = buf
        for value, buf in live.items():
            assert (buf[:: _pages.PAGE] == value).all() and buf[-1] == value
        assert pool.free_bytes <= pool.max_bytes
    assert pool.recycled > 100 and len(moves) > 50
