"""The one boundary for text from outside on its way to a screen or a file.

Model, project, key and workspace names, tags, endpoint names and error bodies come from
providers and from any local client of the proxy. The database keeps them as received (it is
the record); every display escapes them here first:

- :func:`clean` for terminals, logs, Markdown, SVG (via the TUI) and CSV comment lines: control
  characters (C0, DEL, C1, so ESC and BEL), Unicode line and paragraph separators and the bidi
  controls (which can reorder what an operator reads) are shown as ``\\x1b``-style escapes, so
  nothing reaches a terminal as an instruction and the text stays valid XML.
- :func:`csv_cell` for CSV cells: :func:`clean`, then a leading ``=``, ``+``, ``-``, ``@``, tab
  or CR is neutralised with a ``'`` prefix, as OWASP recommends against formula injection.
- :func:`md_cell` for Markdown: :func:`clean`, then the characters Markdown (and HTML inside it)
  would interpret are backslash-escaped, so a table cell stays one cell and nothing links.

Rich/Textual markup is a separate matter: the TUI never parses outside text as markup (it builds
``Text``/``Content`` objects), so ``[red]`` stays literally ``[red]``.
"""

from __future__ import annotations

import re

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029{_BIDI}]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_COMMENT_FORMULA = re.compile(r"(^|[,;])(\s*)([=+\-@])")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>|~])")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: object) -> str:
    """``text`` with every control, line-separator and bidi character shown as an escape.

    Ordinary text, including any other Unicode, passes unchanged; ``None`` becomes ``""``.
    """
    if text is None:
        return ""
    value = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_escape, value)


def csv_cell(value: object) -> object:
    """A CSV cell: numbers as they are, text cleaned and never read as a formula."""
    if value is None or isinstance(value, bool | int | float):
        return value
    raw = value if isinstance(value, str) else str(value)
    text = clean(raw)
    return "'" + text if raw.startswith(_FORMULA_START) else text


def csv_comment(text: object) -> str:
    """Outside text inside a ``#`` comment line of a CSV file: cleaned, and no comma-separated
    piece of it starts a formula (a spreadsheet splits comment lines into cells too)."""
    return _COMMENT_FORMULA.sub(r"\1\2'\3", clean(text))


def md_cell(text: object) -> str:
    """Text for Markdown (a table cell or a list item): cleaned, with markup escaped."""
    return _MARKDOWN.sub(r"\\\1", clean(text))
