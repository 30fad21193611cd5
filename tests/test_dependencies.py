"""The installed dependencies lie within the ranges pyproject.toml declares for them.

pip leaves an environment alone when tokentop is installed without ``-U`` into one that already
has an older genai-prices (whose data prices some dated models wrongly) or another Textual: these
tests name the package, the version found and the range wanted, instead of failing on a price or
a screenshot somewhere else.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _requirement(name: str, extra: str | None = None) -> Requirement:
    """The requirement on ``name`` in pyproject.toml's dependencies (or one extra's)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    found = [
        req
        for req in map(Requirement, listed)
        if canonicalize_name(req.name) == canonicalize_name(name)
    ]
    assert len(found) == 1, f"pyproject.toml lists {name} {len(found)} times in {listed}"
    return found[0]


@pytest.mark.parametrize("name", ["genai-prices", "textual"])
def test_installed_version_is_within_the_declared_range(name: str) -> None:
    required = _requirement(name)
    installed = version(name)
    assert required.specifier, f"pyproject.toml gives {name} no version range: {required}"
    assert required.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is installed, but tokentop requires {required};"
        f" fix it with: pip install '{required}'"
    )


def test_the_snapshot_pin_of_textual_is_within_the_install_range() -> None:
    pinned = _requirement("textual", extra="test")
    (exact,) = pinned.specifier
    assert _requirement("textual").specifier.contains(exact.version), (
        f"the test extra pins {pinned} (the SVG snapshots' Textual), outside the install"
        f" requirement {_requirement('textual')}"
    )
