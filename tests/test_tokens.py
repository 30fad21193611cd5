"""Token counting: exact with a tiktoken encoding, a marked estimate when none can be loaded."""

from __future__ import annotations

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
    assert "o200k_base" not in tokens._cache


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
