"""Shared test setup: every test is offline and isolated from the user's files."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config, data or keys leak in; tiktoken cannot download encodings."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(home / "tiktoken"))
    monkeypatch.setenv("TOKENTOP_OFFLINE", "1")
    for name in (
        "TOKENTOP_DB",
        "TOKENTOP_CONFIG",
        "OPENAI_ADMIN_KEY",
        "ANTHROPIC_ADMIN_KEY",
        "TOKENTOP_OPENAI_BASE_URL",
        "TOKENTOP_ANTHROPIC_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests may connect to 127.0.0.1 only."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        remote = isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1")
        if remote and self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"tests must not touch the network (tried {address!r})")
        return real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh database path."""
    return tmp_path / "tokentop.db"
