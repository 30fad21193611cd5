"""Counting a prompt's tokens with tiktoken, degrading to a marked estimate when it cannot.

tiktoken fetches its encoding files from the internet on first use. When that is impossible
(offline, or ``TOKENTOP_OFFLINE`` is set, as the tests do) the count falls back to about four
characters a token and says it is approximate. Non-OpenAI models are always approximate: their
tokenisers are not public.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

DEFAULT_ENCODING = "o200k_base"
LOAD_TIMEOUT_S = 15.0

_cache: dict[str, Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A token count and how trustworthy it is."""

    tokens: int
    approximate: bool
    method: str
    """How it was counted, e.g. ``tiktoken o200k_base`` or ``~4 characters per token``."""


def _known_encoding(model: str) -> str | None:
    """tiktoken's encoding for an OpenAI model it knows, else ``None``."""
    import tiktoken

    try:
        return str(tiktoken.encoding_name_for_model(model))
    except KeyError:
        return None


def _load(name: str) -> tuple[Any | None, str]:
    """The encoding, or ``None`` and why not. Loading runs in a daemon thread with a timeout so
    a hung download cannot hang the command."""
    with _lock:
        if name in _cache:
            return _cache[name], ""
    result: dict[str, Any] = {}

    def load() -> None:
        try:
            import tiktoken

            result["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:  # offline, blocked, corrupted cache: all mean "unavailable"
            result["error"] = f"{type(exc).__name__}"

    thread = threading.Thread(target=load, daemon=True, name="tiktoken-load")
    thread.start()
    thread.join(LOAD_TIMEOUT_S)
    if "enc" not in result:
        return None, result.get("error", "timed out")
    with _lock:
        _cache[name] = result["enc"]
    return result["enc"], ""


def count_tokens(text: str, model: str, provider: str = "") -> TokenCount:
    """Count the tokens of ``text`` as ``model`` would see them, as well as can be done here."""
    if os.environ.get("TOKENTOP_OFFLINE"):
        return _estimate(text, "offline (TOKENTOP_OFFLINE)")
    try:
        known = _known_encoding(model)
    except ImportError:
        return _estimate(text, "tiktoken not installed")
    # Exact only for OpenAI models tiktoken knows; any other model's tokeniser is not public.
    openai_like = known is not None and provider in ("", "openai", "azure")
    name = known if known is not None and openai_like else DEFAULT_ENCODING
    enc, why = _load(name)
    if enc is None:
        return _estimate(text, f"encoding {name} unavailable: {why}")
    tokens = len(enc.encode(text, disallowed_special=()))
    if openai_like:
        return TokenCount(tokens, False, f"tiktoken {name}")
    return TokenCount(tokens, True, f"tiktoken {name} (approximate for {provider or model})")


def _estimate(text: str, why: str) -> TokenCount:
    return TokenCount(math.ceil(len(text) / 4), True, f"~4 characters per token; {why}")
