"""Token counting: exact with a tiktoken encoding, a marked estimate when none can be loaded."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import tiktoken
import tiktoken.load

from tokentop.pricing import tokens
from tokentop.pricing.tokens import count_tokens

TEXT = "The quick brown fox jumps over the lazy dog"  # 43 characters


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_cache", {})


def test_offline_setting_gives_a_marked_estimate() -> None:
    c = count_tokens(TEXT, "gpt-4o")
    assert c.tokens == 11  # ceil(43 / 4)
    assert c.approximate is True
    assert c.method == "~4 characters per token; offline (TOKENTOP_OFFLINE)"
    assert count_tokens("", "gpt-4o").tokens == 0


def test_blocked_download_gives_an_estimate_without_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    fetched: list[str] = []

    def blocked(blobpath: str) -> bytes:
        fetched.append(blobpath)
        raise OSError("network is blocked in tests")

    monkeypatch.setattr(tiktoken.load, "read_file", blocked)
    c = count_tokens(TEXT, "gpt-4o")
    assert c.approximate is True
    assert c.tokens == 11
    assert c.method == "~4 characters per token; encoding o200k_base unavailable: OSError"
    assert fetched and all(url.startswith("https://") for url in fetched)
    # Remembered: the next counts neither download again nor wait.
    tries = len(fetched)
    started = time.monotonic()
    for _ in range(100):
        assert count_tokens(TEXT, "gpt-4o") == c
    assert len(fetched) == tries
    assert time.monotonic() - started < 0.5


class FakeEncoding:
    """Counts whitespace-separated words, so the expected count is obvious."""

    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        assert kwargs == {"disallowed_special": ()}
        return list(range(len(text.split())))


@pytest.fixture
def fake_tiktoken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    loaded: list[str] = []

    def get_encoding(name: str) -> FakeEncoding:
        loaded.append(name)
        return FakeEncoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    return loaded


def test_loaded_encoding_counts_openai_models_exactly(fake_tiktoken: list[str]) -> None:
    c = count_tokens(TEXT, "gpt-4o")
    assert (c.tokens, c.approximate, c.method) == (9, False, "tiktoken o200k_base")
    c = count_tokens(TEXT, "gpt-3.5-turbo", provider="openai")
    assert (c.tokens, c.approximate, c.method) == (9, False, "tiktoken cl100k_base")
    count_tokens("a b", "gpt-4o-mini")
    assert fake_tiktoken == ["o200k_base", "cl100k_base"]  # each encoding loaded once


def test_loaded_encoding_is_only_approximate_for_claude(fake_tiktoken: list[str]) -> None:
    c = count_tokens(TEXT, "claude-sonnet-4-20250514", provider="anthropic")
    assert c.tokens == 9
    assert c.approximate is True
    assert c.method == "tiktoken o200k_base (approximate for anthropic)"
    bare = count_tokens(TEXT, "claude-3-5-haiku-20241022")
    assert bare.approximate is True
    assert "approximate" in bare.method


def test_unknown_non_openai_model_is_approximate(fake_tiktoken: list[str]) -> None:
    assert count_tokens(TEXT, "gemini-2.5-pro").approximate is True


def test_failed_encoding_is_retried_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    monkeypatch.setattr(tokens, "RETRY_S", 0.0)
    online = threading.Event()

    def get_encoding(name: str) -> FakeEncoding:
        if not online.is_set():
            raise OSError("offline")
        return FakeEncoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    assert count_tokens(TEXT, "gpt-4o").approximate is True
    online.set()
    # The retry runs in the background: this count does not wait for it.
    assert count_tokens(TEXT, "gpt-4o").approximate is True
    tokens._cache["o200k_base"].done.wait(5)
    assert count_tokens(TEXT, "gpt-4o") == tokens.TokenCount(9, False, "tiktoken o200k_base")


def test_hung_load_is_waited_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    release = threading.Event()

    def get_encoding(name: str) -> FakeEncoding:
        release.wait(10)
        return FakeEncoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    started = time.monotonic()
    with tokens.load_wait(0.2):
        first = count_tokens(TEXT, "gpt-4o")
    assert (
        first.method
        == "~4 characters per token; encoding o200k_base unavailable: timed out after 0.2 s"
    )
    assert 0.15 < time.monotonic() - started < 2
    started = time.monotonic()
    assert count_tokens(TEXT, "gpt-4o").approximate is True  # no second wait
    assert time.monotonic() - started < 0.1
    release.set()
    tokens._cache["o200k_base"].done.wait(5)
    assert count_tokens(TEXT, "gpt-4o").approximate is False  # the late load is used


def test_wait_for_a_load_can_be_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    release = threading.Event()
    cancel = threading.Event()

    def get_encoding(name: str) -> FakeEncoding:
        release.wait(10)
        return FakeEncoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    threading.Timer(0.1, cancel.set).start()
    started = time.monotonic()
    with tokens.load_wait(30, cancel):
        assert count_tokens(TEXT, "gpt-4o").method.endswith("unavailable: still loading")
    assert time.monotonic() - started < 2
    release.set()
