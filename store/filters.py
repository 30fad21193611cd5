"""Filters shared by the screen and the reports: which usage rows a view selects.

A filter is a list of terms, all of which must match (quote a value that holds spaces):

- ``gpt``: a substring of the provider, model, project, tag or API key (case-insensitive, as
  SQLite's ``LIKE``);
- ``model:gpt-4o`` (also ``provider:``, ``project:``, ``tag:``, ``key:`` or ``api_key:``): exactly
  that value of one dimension, as a drill-down writes it. ``model:ft:acme`` is model ``ft:acme``;
  ``ft:acme`` alone is a substring, since ``ft`` is no dimension.

This module imports nothing of the project, so the queries can use it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DIMENSIONS: dict[str, str] = {
    "provider": "provider",
    "model": "model",
    "project": "project",
    "tag": "tag",
    "api_key": "api_key",
    "key": "api_key",
}
"""Filter prefixes and the column each one matches exactly."""


@dataclass(frozen=True, slots=True)
class Term:
    """One term of a filter: ``column`` equals ``value``, or (``column`` ``None``) ``value`` is a
    substring of any filtered column."""

    value: str
    column: str | None = None


def parse_filter(text: str) -> list[Term]:
    """The terms of a filter (see the module's docstring); an unbalanced quote is taken
    literally rather than refused, since the filter box parses on every keystroke."""
    text = text.strip()
    if not text:
        return []
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    terms: list[Term] = []
    for word in words:
        prefix, sep, value = word.partition(":")
        column = DIMENSIONS.get(prefix.lower()) if sep else None
        if column is not None:
            terms.append(Term(value, column))
        elif word:
            terms.append(Term(word))
    return terms


def filter_sql(text: str, columns: Sequence[str]) -> tuple[str, list[Any]]:
    """``" AND (...)"`` and its parameters for a filter over ``columns`` (``""`` without one).

    A term on a dimension the table does not have (``project:`` on metered requests) matches
    nothing there: those rows are not known to belong to it.
    """
    clauses: list[str] = []
    params: list[Any] = []
    for term in parse_filter(text):
        if term.column is not None:
            if term.column in columns:
                clauses.append(f"{term.column} = ?")
                params.append(term.value)
            else:
                clauses.append("0")
            continue
        # The text is literal: LIKE's wildcards in it are escaped.
        escaped = term.value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        clauses.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '!'" for c in columns) + ")")
        params += [f"%{escaped}%"] * len(columns)
    if not clauses:
        return "", []
    return " AND (" + " AND ".join(clauses) + ")", params


def drill_term(group: str, value: str) -> str:
    """The filter term that selects exactly ``value`` of grouping ``group`` (``model:gpt-4o``)."""
    if group not in DIMENSIONS:
        raise ValueError(f"cannot drill into {group!r}; choose one of {', '.join(DIMENSIONS)}")
    if value and not any(c.isspace() or c in "'\"\\" for c in value):
        return f"{group}:{value}"
    return f"{group}:{shlex.quote(value)}"


def add_term(text: str, term: str) -> str:
    """``text`` with ``term`` added (all terms must match)."""
    return f"{text.strip()} {term}".strip()


def filtered_groups(text: str) -> set[str]:
    """The groupings a filter pins to one value (drilling further into them shows one row)."""
    return {t.column for t in parse_filter(text) if t.column is not None}
