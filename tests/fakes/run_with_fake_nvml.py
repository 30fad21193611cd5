"""Run the ``tokentop`` command with fake GPUs in place of NVML (for end-to-end tests).

    python -m tests.fakes.run_with_fake_nvml SPEC.json -- collect --interval 1 --db X.db
    python tests/fakes/run_with_fake_nvml.py SPEC.json -- collect --once

``SPEC.json`` is described in :mod:`tests.fakes.nvml` (``{"gpus": [{...}, {...}]}``). The fake
is installed into the real ``pynvml`` module before ``tokentop.tui.cli.main`` runs, so the shipped
code carries no test hook. The exit status is ``main``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    spec, rest = args[0], args[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.fakes.nvml import FakeNvml

    FakeNvml.from_file(spec).install()
    from tokentop.tui.cli import main as tokentop

    return tokentop(rest)


if __name__ == "__main__":
    sys.exit(main())
