"""Counting a prompt's tokens with tiktoken, degrading to a marked estimate when it cannot.

tiktoken fetches its encoding files from the internet on first use. When that is impossible
(offline, or ``TOKENTOP_OFFLINE`` is set, as the tests do) the count falls back to about four
characters a token and says it is approximate. Non-OpenAI models are always approximate: their
tokenisers are not public.

An encoding is loaded in a background thread, once. A failure is remembered: later counts fall
back at once instead of trying the download again (offline, each try can take seconds), and a
new try starts in the background at most every :data:`RETRY_S`, with no caller waiting for it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ENCODING = "o200k_base"
LOAD_TIMEOUT_S = 15.0
"""Longest wait for an encoding's first load (a hung download cannot hang the caller)."""
RETRY_S = 300.0
"""After a failed load, how long until the encoding is tried again (in the background)."""


@dataclass(slots=True)
class _Encoding:
    """One encoding's load: loaded, loading, or failed (and when)."""

    enc: Any = None
    loading: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    failed_at: float | None = None
    """``time.monotonic()`` of the last failure (or of a first wait that timed out)."""


_cache: dict[str, _Encoding] = {}
_lock = threading.Lock()
_local = threading.local()


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


@contextlib.contextmanager
def load_wait(seconds: float, cancel: threading.Event | None = None) -> Iterator[None]:
    """Inside the block, this thread waits at most ``seconds`` for an encoding's first load,
    and stops waiting as soon as ``cancel`` is set (the count then falls back to an estimate).

    Outside any such block the wait is :data:`LOAD_TIMEOUT_S`.
    """
    previous = getattr(_local, "wait", None)
    _local.wait = (seconds, cancel)
    try:
        yield
    finally:
        _local.wait = previous


def _start(name: str, state: _Encoding) -> None:
    """Load ``name`` in a daemon thread (call with ``_lock`` held)."""
    state.loading = True
    state.done = threading.Event()

    def load() -> None:
        enc: Any = None
        error = ""
        try:
            import tiktoken

            enc = tiktoken.get_encoding(name)
        except Exception as exc:  # offline, blocked, corrupted cache: all mean "unavailable"
            error = type(exc).__name__
        with _lock:
            if enc is not None:
                state.enc, state.error, state.failed_at = enc, "", None
            else:
                state.error, state.failed_at = error, time.monotonic()
            state.loading = False
            state.done.set()

    threading.Thread(target=load, daemon=True, name=f"tiktoken-load-{name}").start()


def _load(name: str) -> tuple[Any | None, str]:
    """The encoding, or ``None`` and why not."""
    with _lock:
        state = _cache.get(name)
        if state is None:
            state = _cache[name] = _Encoding()
        if state.enc is not None:
            return state.enc, ""
        if state.failed_at is not None:  # known to be unavailable: never wait again
            if not state.loading and time.monotonic() - state.failed_at >= RETRY_S:
                _start(name, state)
            return None, state.error
        if not state.loading:
            _start(name, state)
        done = state.done
    seconds, cancel = getattr(_local, "wait", None) or (LOAD_TIMEOUT_S, None)
    if cancel is None:
        done.wait(seconds)
    else:
        deadline = time.monotonic() + seconds
        while not done.is_set() and not cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done.wait(min(0.05, left))
    with _lock:
        if state.enc is not None:
            return state.enc, ""
        expired = seconds > 0 and not done.is_set() and not (cancel and cancel.is_set())
        if expired and state.failed_at is None:
            # A load that hangs counts as failed: nobody waits for it again (it may still
            # finish in the background, and is used from then on).
            state.error, state.failed_at = f"timed out after {seconds:g} s", time.monotonic()
        return None, state.error or "still loading"


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
