"""Command-line parts of the per-request meter (``proxy`` and ``session``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the meter's subcommands to the ``tokentop`` parser."""


HANDLERS: dict[str, Callable[[Any], int]] = {}
"""Subcommand name to handler taking the CLI context (``tui.cli._Context``)."""
