"""The config's error type and the check every section's ``validate`` uses."""

from __future__ import annotations

import reprlib
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the key or file.

    ``key`` is the dotted key (or ``a/b`` for a rule over two keys, or a section) the error is
    about, so ``load_config`` can say which layer set it.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _show(value: Any) -> str:
    """A bounded repr for error messages (``repr`` of a 5,000-digit integer itself raises)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    return reprlib.repr(value)


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}, got {_show(value)}", key)
