"""Ctrl-C for polling commands: the first SIGINT is a flag the loop sees between polls (no KeyboardInterrupt inside
whatever runs), a second one raises KeyboardInterrupt as usual, and the previous handler comes back; and
``patchwire top`` ended by Ctrl-C as a user ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patchwire.cli._interrupt import Interrupt

from _servers import child_env, threaded_server


def test_the_first_ctrl_c_is_a_flag_and_the_second_interrupts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with Interrupt() as stop:
        assert not stop.interrupted and not stop.wait(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        started = time.monotonic()
        assert stop.wait(5) and stop.interrupted
        assert time.monotonic() - started < 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next bytecode)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_handler_is_restored_when_no_ctrl_c_came() -> None:
    before = signal.getsignal(signal.SIGINT)
    with Interrupt() as stop:
        assert signal.getsignal(signal.SIGINT) is not before
        assert not stop.wait(0)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_ends_top_with_130(tiny_h5: Path) -> None:
    with threaded_server({"tiny": tiny_h5}) as handle:
        top = subprocess.Popen(
            [sys.executable, "-m", "patchwire.cli", "top", handle.server.address, "--interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        try:
            assert top.stdout is not None
            assert top.stdout.readline().decode().startswith(handle.server.address)
            top.send_signal(signal.SIGINT)
            _, err = top.communicate(timeout=30)
        finally:
            if top.poll() is None:
                top.kill()
                top.communicate()
    assert top.returncode == 130, err
    assert b"Traceback" not in err
