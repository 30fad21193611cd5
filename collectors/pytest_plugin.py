"""The tokentop pytest plugin (``pytest --tokentop``): per-test LLM cost."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's options (the plugin stays off unless ``--tokentop`` is given)."""
    group = parser.getgroup("tokentop")
    group.addoption("--tokentop", action="store_true", help="meter LLM requests per test")
