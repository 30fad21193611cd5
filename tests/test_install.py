"""tokentop installed into someone else's project, for real: a wheel (and an editable install) in a
fresh virtual environment, next to a user project that has its own ``collectors``, ``store``,
``pricing`` and ``tui`` packages.

Offline: the wheel is built without build isolation from this checkout (setuptools comes from the
test environment), installed without an index, and the new environment sees the test environment's
other packages (pytest, httpx, ...) through a ``.pth`` line. That line adds a plain directory, so
``.pth`` files there (an editable install's import hook) are not run: the fresh environment's
``tokentop`` is the one installed into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("collectors", "store", "pricing", "tui")
ISOLATION = ["--no-build-isolation"]  # offline: the test environment's setuptools builds
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.db*"
)


def _run(args: list[str | Path], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="module", params=["wheel", "editable"])
def installed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with tokentop installed as a wheel or editable; its python."""
    tmp = tmp_path_factory.mktemp(f"install-{request.param}")
    source = tmp / "tokentop-src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=COPY_IGNORE)
    env = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    outer = sysconfig.get_paths()["purelib"]
    (_site_packages(env) / "zz_test_environment.pth").write_text(outer + "\n")
    # `pip --python` runs pip (and the build backend) in the new environment, which finds
    # setuptools through that line; --ignore-installed leaves the test environment's own tokentop
    # alone.
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps"]
    pip += ["--no-index", *ISOLATION, "--ignore-installed"]
    if request.param == "wheel":
        dist = tmp / "dist"
        wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"]
        built = _run([*wheel, *ISOLATION, "-w", dist, source], cwd=tmp)
        assert built.returncode == 0, built.stdout + built.stderr
        done = _run([*pip, *dist.glob("tokentop-*.whl")], cwd=tmp)
    else:
        done = _run([*pip, "-e", source], cwd=tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    # What `pip install pytest` would put in bin/: the `pytest` command.
    script = env / "bin" / "pytest"
    script.write_text(
        f"#!{python}\nimport sys\nfrom pytest import console_main\nsys.exit(console_main())\n"
    )
    script.chmod(0o755)
    return python


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(record=False) as up:
        yield up


def _user_project(path: Path, upstream: FakeUpstream) -> Path:
    for name in GENERIC:
        (path / name).mkdir(parents=True)
        (path / name / "__init__.py").write_text(f'OWNER = "user"\nNAME = "{name}"\n')
    (path / "tests").mkdir()
    (path / "tests" / "__init__.py").write_text("")
    (path / "tests" / "test_app.py").write_text(
        f"""
import pathlib

import collectors
import pricing
import store
import tui

PROJECT = pathlib.Path(__file__).resolve().parents[1]


def test_store_is_ours():
    assert store.OWNER == "user" and pathlib.Path(store.__file__).parent == PROJECT / "store"


def test_collectors_and_tui_are_ours():
    assert (collectors.NAME, tui.NAME) == ("collectors", "tui")
    assert pathlib.Path(tui.__file__).parent == PROJECT / "tui"


def test_pricing_is_ours():
    assert pricing.OWNER == "user"


def test_calls_the_model():
    import openai

    client = openai.OpenAI(base_url="{upstream.url}/v1", api_key="sk-test", max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}]
    )
"""
    )
    return path


def test_only_the_tokentop_namespace_is_installed(installed: Path, tmp_path: Path) -> None:
    site = _site_packages(installed.parents[1])
    assert not [name for name in GENERIC if (site / name).exists()]
    probe = (
        "import importlib, importlib.util, tokentop, tokentop.collectors.pytest_plugin\n"
        "import tokentop.pricing.book, tokentop.store.db, tokentop.tui.cli\n"
        "print(tokentop.__version__)\n"
        "print(sorted(n for n in ('collectors', 'store', 'pricing', 'tui')"
        " if importlib.util.find_spec(n)))\n"
    )
    done = _run([installed, "-c", probe], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    version, leaked = done.stdout.split("\n")[:2]
    assert version and leaked == "[]"
    cli = _run([installed, "-m", "tokentop", "--version"], cwd=tmp_path)
    assert cli.returncode == 0 and cli.stdout.strip() == f"tokentop {version}", cli.stderr


@pytest.mark.parametrize("command", ["python -m pytest", "pytest", "pytest --tokentop"])
def test_a_user_project_with_the_same_package_names_runs_its_tests(
    installed: Path, upstream: FakeUpstream, tmp_path: Path, command: str
) -> None:
    project = _user_project(tmp_path / "project", upstream)
    program, *args = command.split()
    argv = [installed if program == "python" else installed.parent / "pytest", *args]
    done = _run([*argv, "-p", "no:cacheprovider"], cwd=project)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "4 passed" in out
    assert "Error" not in out
    if "--tokentop" in args:
        assert "tokentop: LLM cost per test" in out
        assert "tests/test_app.py::test_calls_the_model" in out
    else:
        assert "LLM cost" not in out
