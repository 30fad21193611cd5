"""tokentop: htop for LLM spend.

Installed, the project is this one package: ``tokentop.collectors``, ``tokentop.pricing``,
``tokentop.store`` and ``tokentop.tui``. In the repository those live in the top-level folders of
the same names (the layout DESIGN.md fixes); the build maps them under ``tokentop`` (see
``pyproject.toml``), and the links beside this file let a checkout, ``mypy`` and the tests see the
same names without an install.
"""

__version__ = "0.2.0"
