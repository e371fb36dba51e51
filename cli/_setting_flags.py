"""Flags that set one server setting each, only when given.

A setting's default lives in one place, its dataclass (:class:`patchwire.service.ServerConfig`,
:class:`~patchwire.service.Limits`, ...): a flag has no argparse default (``argparse.SUPPRESS``), so a flag not given
leaves the configuration file's or the environment's value alone (:mod:`patchwire.service._settings` merges them),
and ``--help`` shows the dataclass's default, looked up when help is printed (:class:`DefaultsFromSettings`).

A flag's ``dest`` is its setting's key (``port``, ``limits.max_calls``); ``patchwire serve`` hands every parsed value
whose ``dest`` is a key to the settings, so one :func:`setting_flag` call is all a new setting's flag needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["FLAG_NAMES", "DefaultsFromSettings", "in_bytes", "setting_flag"]

_MiB = 1 << 20

FLAG_NAMES: dict[str, str] = {}
"""Setting key -> the flag that sets it (for messages: ``--cache-mb: ...``)."""
_UNITS: dict[str, int] = {}
"""Setting key -> bytes per unit of its flag (MiB for the ``-mb`` flags), for the default shown in help."""


def in_bytes(unit: int, least: float = 0) -> Callable[[str], int]:
    """An argparse type: a number of ``unit`` (MiB: ``0.5`` is 512 KiB) as whole bytes, at least ``least`` units
    (above 0 when ``least`` is 0 and the flag is a limit: see :func:`setting_flag`)."""

    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < least or value != value:
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {text}")
        return int(value * unit)

    return parse


def setting_flag(
    group: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, key: str, unit: int = 1, **kwargs: Any
) -> argparse.Action:
    """Adds ``flags`` setting ``key`` when given (and only then). ``unit``: bytes per unit of a flag for a byte size
    (the value is converted to bytes: ``--cache-mb 0.5`` sets 512 KiB); other keyword arguments as
    ``add_argument``'s. Help ends with the setting's default, in the flag's unit."""
    if unit != 1:
        kwargs.setdefault("type", in_bytes(unit))
        kwargs.setdefault("metavar", "MB" if unit == _MiB else "N")
        _UNITS[key] = unit
    FLAG_NAMES[key] = flags[0]
    return group.add_argument(*flags, dest=key, default=argparse.SUPPRESS, **kwargs)


class DefaultsFromSettings(argparse.HelpFormatter):
    """Help that ends each setting's flag with its default from the dataclass (imported only when help is shown:
    building the parser stays light)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = _default_shown(action.dest)
        if shown is None or "%(default)" in text:
            return text
        return f"{text[:-1]}; default {shown})" if text.endswith(")") else f"{text} (default {shown})"


def _default_shown(key: str) -> str | None:
    """The default of setting ``key`` as its flag writes it; None for a key that is no setting, a setting without a
    fixed default (none, or one computed where the server runs, like the host name), or one whose flag is a
    switch."""
    from dataclasses import MISSING, fields

    from patchwire.service._settings import settings

    setting = settings().get(key)
    if setting is None or {f.name: f for f in fields(setting.owner)}[setting.name].default_factory is not MISSING:
        return None
    default = setting.default
    if default is MISSING or default is None or isinstance(default, bool):
        return None
    if key in _UNITS:
        default = default / _UNITS[key]
    if isinstance(default, float):
        default = f"{default:g}"
    return str(default).replace("%", "%%")
