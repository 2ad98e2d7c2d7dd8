"""The one exception every part of the device model raises, so callers catch a single type."""

from __future__ import annotations


class DeviceError(ValueError):
    """A fleet config or trace file is invalid; the message names the file/row/key and problem."""
