"""``parse_args`` builds only the parser of the command given (a status bar's ``tokentop status``
starts without building every other command's parser): what it parses, and every error, must be
what the whole parser says."""

from __future__ import annotations

import argparse

import pytest

from tokentop.tui import cli


def _whole(argv: list[str]) -> argparse.Namespace | str:
    try:
        return cli.build_parser().parse_args(argv)
    except cli.UsageError as exc:
        return f"error: {exc}"


def _fast(argv: list[str]) -> argparse.Namespace | str:
    try:
        return cli.parse_args(argv)
    except cli.UsageError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--db", "x.db", "--format", "{burn}"],
        ["--db", "x.db", "status", "--json"],
        ["--db=x.db", "-v", "--demo", "status", "--stale-after", "5m"],
        ["--config", "c.toml", "check", "--rule", "daily-budget"],
        ["report", "--since", "2h", "--group-by", "tag", "--sort", "cost:asc"],
        ["export", "--format", "md", "-o", "out.md"],
        ["price", "gpt-4o", "--input", "1000", "--output", "200"],
        ["collect", "--once", "--interval", "1"],
        ["db", "info"],
        ["session", "start", "feature-x"],
        ["--window", "6h", "status"],  # a global option outside the fast path's list
        ["--demo"],
        ["--db", "status"],  # a database named "status", and no command: the TUI
        ["--db", "status", "status"],
        [],
    ],
)
def test_the_one_command_parse_is_the_whole_parse(argv: list[str]) -> None:
    assert _fast(argv) == _whole(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["statsu"],  # not a command: the error lists every command
        ["status", "--format"],
        ["status", "--stale-after", "soon"],
        ["price", "gpt-4o", "--input", "-1"],
        ["report", "--group-by", "colour"],
        ["db", "compactt"],
    ],
)
def test_errors_read_as_the_whole_parser_says_them(argv: list[str]) -> None:
    whole = _whole(argv)
    assert isinstance(whole, str)
    assert _fast(argv) == whole
