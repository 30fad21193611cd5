"""The tokentop pytest plugin (``pytest --tokentop``): per-test LLM cost.

A good guest in every environment tokentop is installed into: loading it imports only the standard
library (pytest loads it from the ``pytest11`` entry point; ``-p no:tokentop`` turns it off), and
it changes nothing until ``--tokentop`` is given or a collected test carries the ``llm_budget``
marker (the marker is always registered, so that ``--strict-markers`` accepts it). When on:

- **How calls are metered.** For the whole session the plugin patches the default transports of
  ``httpx`` and ``httpx2`` (``HTTPTransport.handle_request`` and
  ``AsyncHTTPTransport.handle_async_request``; see :func:`tokentop.collectors.meter.install`). The
  OpenAI and Anthropic SDKs send through those transports, so an unmodified ``openai.OpenAI(...)``
  or ``anthropic.Anthropic(...)`` client is metered, sync or async, streaming or not. A client built
  on a custom transport (``httpx.MockTransport``, say) is not; wrap its transport in
  :class:`tokentop.collectors.meter.MeteredTransport` to meter it. Requests through the tokentop
  proxy are metered here too (the client's request is what is seen).
- **Attribution.** A request belongs to the test that is running (setup, call or teardown) when
  its response ends; its tag is the test's node id unless ``X-Tokentop-Tag`` or
  :func:`tokentop.collectors.meter.tagged` says otherwise. A session-scoped fixture's requests land
  on the first test that used it.
- **Report.** At the end, a table per test: requests, input and output tokens, cost and cost per
  request, priced with the price book (and the ``[pricing]`` of the tokentop config file).
  ``~`` marks estimated figures (a response without usage), ``unpriced`` models without a price.
- **Gates.** ``@pytest.mark.llm_budget(usd=0.01)`` fails a test whose requests cost more, saying
  by how much; ``--tokentop-budget USD`` fails the run above a total; ``--tokentop-baseline FILE``
  compares each test with an earlier ``--tokentop-json`` file and ``--tokentop-max-increase PCT``
  fails the run when a test's (or the total) cost rose by more than PCT percent.
- ``--tokentop-db PATH`` also records every request in a tokentop database (tagged with the test
  id), for the TUI, ``tokentop report`` and sessions.

- **pytest-xdist.** Each worker meters its own tests and enforces their markers; at the end it
  hands its figures to the controller (``workeroutput``), which prints one table for the whole
  run and applies ``--tokentop-budget``, ``--tokentop-baseline`` and ``--tokentop-json`` to it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pytest

MARKER = "llm_budget"
PLUGIN_NAME = "tokentop-meter"
WORKER_KEY = "tokentop"
OUTSIDE = "(outside tests)"
JSON_VERSION = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's options (the plugin stays off unless ``--tokentop`` is given)."""
    group = parser.getgroup("tokentop", "per-test LLM cost (tokentop)")
    group.addoption("--tokentop", action="store_true", help="meter LLM requests per test")
    group.addoption(
        "--tokentop-budget",
        metavar="USD",
        default=None,
        help="fail the run when all tests together cost more than USD",
    )
    group.addoption(
        "--tokentop-json", metavar="FILE", default=None, help="write per-test results as JSON"
    )
    group.addoption(
        "--tokentop-baseline",
        metavar="FILE",
        default=None,
        help="compare with an earlier --tokentop-json file",
    )
    group.addoption(
        "--tokentop-max-increase",
        metavar="PCT",
        default=None,
        help="with --tokentop-baseline: fail when a test's cost rose by more than PCT percent",
    )
    group.addoption(
        "--tokentop-db",
        metavar="PATH",
        default=None,
        help="also record each request in this tokentop database",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; start metering when ``--tokentop`` is given."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(usd): fail the test when its metered LLM requests cost more than usd dollars "
        "(needs --tokentop)",
    )
    if not config.getoption("tokentop"):
        for name in ("budget", "json", "baseline", "max_increase", "db"):
            if config.getoption(f"tokentop_{name}") is not None:
                flag = "--tokentop-" + name.replace("_", "-")
                raise pytest.UsageError(f"{flag} needs --tokentop")
        return
    _activate(config)


def _is_xdist_controller(config: pytest.Config) -> bool:
    """True in the process that hands tests to pytest-xdist workers and runs none itself."""
    return not hasattr(config, "workerinput") and getattr(config.option, "dist", "no") != "no"


def _activate(config: pytest.Config) -> TokentopPlugin:
    """The session's plugin instance, registered on first use."""
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if isinstance(plugin, TokentopPlugin):
        return plugin
    plugin = TokentopPlugin(config, meter=not _is_xdist_controller(config))
    config.pluginmanager.register(plugin, PLUGIN_NAME)
    return plugin


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Without ``--tokentop``, a test that carries ``llm_budget`` still gets its budget enforced:
    metering starts for the run (after collection, before the first test)."""
    if config.getoption("tokentop"):
        return
    if any(item.get_closest_marker(MARKER) is not None for item in items):
        _activate(config)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist, in the controller: a worker finished; add its figures to the run's."""
    results = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if results:
        _activate(node.config).merge(results)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop metering."""
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if isinstance(plugin, TokentopPlugin):
        plugin.close()
        config.pluginmanager.unregister(plugin)


def _decimal(value: str, flag: str) -> Decimal:
    try:
        number = Decimal(value.strip().lstrip("$").rstrip("%"))
    except InvalidOperation:
        raise pytest.UsageError(f"{flag}: expected a number, got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise pytest.UsageError(f"{flag}: expected a non-negative number, got {value!r}")
    return number


def usd(value: Decimal | None) -> str:
    """Dollars to the nano-dollar, without trailing zeros: ``$0.000345``."""
    if value is None:
        return "-"
    d = value.quantize(Decimal("0.000000001"))
    text = f"{d:f}".rstrip("0")
    if text.endswith("."):
        text += "00"
    elif len(text.split(".")[1]) < 2:
        text += "0"
    return f"${text}"


@dataclass
class TestCost:
    """What one test's metered requests cost."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    unpriced: int = 0
    estimated: int = 0
    models: set[str] = field(default_factory=set)

    @property
    def cost(self) -> Decimal:
        """Cost of the priced requests."""
        return Decimal(self.cost_nano) / 1_000_000_000

    @property
    def cost_per_request(self) -> Decimal | None:
        """Mean cost of a priced request."""
        priced = self.requests - self.unpriced
        return self.cost / priced if priced else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestCost:
        """The inverse of :meth:`as_dict` (how xdist workers hand figures to the controller)."""
        return cls(
            requests=int(data["requests"]),
            input_tokens=int(data["input_tokens"]),
            output_tokens=int(data["output_tokens"]),
            cost_nano=int(data["cost_nano"]),
            unpriced=int(data["unpriced_requests"]),
            estimated=int(data["estimated_requests"]),
            models=set(data["models"]),
        )

    def add(self, other: TestCost) -> None:
        """Add another set of figures to these."""
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_nano += other.cost_nano
        self.unpriced += other.unpriced
        self.estimated += other.estimated
        self.models |= other.models

    def as_dict(self) -> dict[str, Any]:
        per = self.cost_per_request
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": float(self.cost),
            "cost_nano": self.cost_nano,
            "cost_per_request_usd": None if per is None else float(round(per, 9)),
            "unpriced_requests": self.unpriced,
            "estimated_requests": self.estimated,
            "models": sorted(self.models),
        }


class TokentopPlugin:
    """The plugin's state for one pytest session."""

    def __init__(self, config: pytest.Config, *, meter: bool = True) -> None:
        """Read the options and, unless ``meter`` is false (an xdist controller, which runs no
        test), install the meter."""
        from tokentop.collectors.config import ConfigError, load_config
        from tokentop.collectors.meter import Meter, Recorder, install
        from tokentop.pricing.book import PriceBook

        self.config = config
        budget = config.getoption("tokentop_budget")
        self.budget = None if budget is None else _decimal(budget, "--tokentop-budget")
        increase = config.getoption("tokentop_max_increase")
        self.max_increase = (
            None if increase is None else _decimal(increase, "--tokentop-max-increase")
        )
        json_path = config.getoption("tokentop_json")
        self.json_path = None if json_path is None else Path(json_path)
        baseline = config.getoption("tokentop_baseline")
        self.baseline: dict[str, Any] | None = None
        if self.max_increase is not None and baseline is None:
            raise pytest.UsageError("--tokentop-max-increase needs --tokentop-baseline")
        if baseline is not None:
            self.baseline = _load_baseline(Path(baseline))
        try:
            tokentop_config = load_config(None)
        except ConfigError as exc:
            raise pytest.UsageError(f"tokentop config: {exc}") from None
        self.book = PriceBook(tokentop_config.pricing)
        self.current: str | None = None
        self.results: dict[str, TestCost] = {}
        self.failures: list[str] = []
        self.comparison: list[tuple[str, TestCost | None, dict[str, Any] | None, float | None]] = []
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._budget_failed: set[str] = set()
        self.worker = hasattr(config, "workerinput")
        self.recorder: Recorder | None = None
        self._uninstall: Callable[[], None] = lambda: None
        if not meter:
            return
        self.meter = Meter([self._collect], default_tag=lambda: self.current or "")
        db = config.getoption("tokentop_db")
        if db is not None:
            self.recorder = Recorder(Path(db), self.book, health_name="pytest")
            self.meter.add_sink(self.recorder)
        self._uninstall = install(self.meter)

    def close(self) -> None:
        """Uninstall the meter and flush the recorder."""
        self._uninstall()
        if self.recorder is not None:
            self.recorder.close()

    def _collect(self, exchange: Any) -> None:
        with self._lock:
            self._pending.append((self.current or OUTSIDE, exchange))

    def settle(self) -> None:
        """Price what arrived since the last call and add it to each test's figures."""
        from tokentop.collectors.meter import finalize

        with self._lock:
            pending, self._pending = self._pending, []
        for nodeid, exchange in pending:
            request = finalize(exchange, self.book)
            if request is None:
                continue
            cost = self.results.setdefault(nodeid, TestCost())
            cost.requests += 1
            cost.input_tokens += (
                request.input_uncached
                + request.cache_read
                + request.cache_write_5m
                + request.cache_write_1h
            )
            cost.output_tokens += request.output
            cost.models.add(request.model)
            if request.priced:
                cost.cost_nano += request.cost_nano
            else:
                cost.unpriced += 1
            if request.estimated:
                cost.estimated += 1

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "setup":
            return report
        self.settle()
        marker = item.get_closest_marker(MARKER)
        if marker is None or item.nodeid in self._budget_failed:
            return report
        try:
            budget = _marker_budget(marker)
        except ValueError as exc:
            self._budget_failed.add(item.nodeid)
            report.outcome = "failed"
            report.longrepr = str(exc)
            return report
        spent = self.results.get(item.nodeid, TestCost())
        if spent.cost <= budget:
            return report
        self._budget_failed.add(item.nodeid)
        over = spent.cost - budget
        pct = f" ({over / budget * 100:.1f}% over)" if budget else ""
        message = (
            f"llm_budget exceeded by {usd(over)}{pct}: this test's {spent.requests} LLM "
            f"request(s) cost {usd(spent.cost)} against a budget of {usd(budget)}"
        )
        if report.passed:
            report.outcome = "failed"
            report.longrepr = message
        else:
            report.sections.append(("tokentop", message))
        return report

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.settle()
        if self.worker:
            # The controller applies the run-wide gates and prints the table.
            output: dict[str, Any] = getattr(self.config, "workeroutput", {})
            output[WORKER_KEY] = {n: c.as_dict() for n, c in self.results.items()}
            return
        total = self.total()
        if self.budget is not None and total.cost > self.budget:
            over = total.cost - self.budget
            pct = f" ({over / self.budget * 100:.1f}% over)" if self.budget else ""
            self.failures.append(
                f"total LLM cost {usd(total.cost)} exceeds --tokentop-budget {usd(self.budget)}"
                f" by {usd(over)}{pct}"
            )
        if self.baseline is not None:
            self._compare(self.baseline, total)
        if self.json_path is not None:
            self._write_json(total)
        if self.failures and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def total(self) -> TestCost:
        """All tests together."""
        total = TestCost()
        for cost in self.results.values():
            total.add(cost)
        return total

    def merge(self, results: dict[str, dict[str, Any]]) -> None:
        """Add an xdist worker's per-test figures."""
        for nodeid, data in results.items():
            self.results.setdefault(nodeid, TestCost()).add(TestCost.from_dict(data))

    def _compare(self, baseline: dict[str, Any], total: TestCost) -> None:
        old_tests: dict[str, Any] = baseline.get("tests", {})
        for nodeid in sorted(set(old_tests) | set(self.results)):
            now = self.results.get(nodeid)
            old = old_tests.get(nodeid)
            change = _change(old, now)
            self.comparison.append((nodeid, now, old, change))
            if self.max_increase is not None and change is not None and change > self.max_increase:
                self.failures.append(
                    f"{nodeid}: LLM cost rose {change:.1f}% ({usd(_nano(old))} -> "
                    f"{usd(now.cost if now else Decimal(0))}), more than "
                    f"--tokentop-max-increase {self.max_increase}%"
                )
        change = _change(baseline.get("total"), total)
        self.comparison.append(("TOTAL", total, baseline.get("total"), change))
        if self.max_increase is not None and change is not None and change > self.max_increase:
            self.failures.append(
                f"total LLM cost rose {change:.1f}% ({usd(_nano(baseline.get('total')))} -> "
                f"{usd(total.cost)}), more than --tokentop-max-increase {self.max_increase}%"
            )

    def _write_json(self, total: TestCost) -> None:
        data = {
            "tokentop": {"kind": "pytest", "version": JSON_VERSION},
            "created_at": datetime.now(UTC).isoformat(),
            "prices": {
                "source": self.book.describe()["source"],
                "version": self.book.describe()["version"],
            },
            "budget_usd": None if self.budget is None else float(self.budget),
            "total": total.as_dict(),
            "tests": {nodeid: cost.as_dict() for nodeid, cost in sorted(self.results.items())},
            "failures": self.failures,
        }
        assert self.json_path is not None
        try:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            self.failures.append(f"--tokentop-json: cannot write {self.json_path}: {exc.strerror}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker:
            return
        tr = terminalreporter
        tr.write_sep("=", "tokentop: LLM cost per test")
        rows = sorted(self.results.items(), key=lambda kv: (-kv[1].cost_nano, kv[0]))
        if not rows:
            tr.write_line("no metered LLM requests")
        else:
            width = min(max(len(n) for n, _ in rows), 70)
            head = (
                f"{'test':<{width}} {'requests':>8} {'tokens in':>10} {'tokens out':>10}"
                f" {'$':>14} {'$/request':>14}"
            )
            tr.write_line(head)
            for nodeid, cost in [*rows, ("TOTAL", self.total())]:
                tr.write_line(_row(nodeid, cost, width))
        if self.budget is not None:
            total = self.total()
            verdict = "over" if total.cost > self.budget else "within"
            tr.write_line(
                f"budget: {usd(total.cost)} of {usd(self.budget)} ({verdict} --tokentop-budget)"
            )
        if self.comparison:
            tr.write_sep("-", "tokentop: change against the baseline")
            for nodeid, now, old, change in self.comparison:
                was = usd(_nano(old)) if old else "new"
                is_ = usd(now.cost) if now else "gone"
                pct = "" if change is None else f" ({change:+.1f}%)"
                tr.write_line(f"{nodeid}: {was} -> {is_}{pct}")
        for failure in self.failures:
            tr.write_line(f"tokentop FAILED: {failure}", red=True, bold=True)


def _row(nodeid: str, cost: TestCost, width: int) -> str:
    mark = "~" if cost.estimated else ""
    money = usd(cost.cost) if cost.requests > cost.unpriced else "unpriced"
    if cost.unpriced and cost.requests > cost.unpriced:
        money += "+?"
    per = cost.cost_per_request
    name = nodeid if len(nodeid) <= width else "..." + nodeid[-(width - 3) :]
    return (
        f"{name:<{width}} {cost.requests:>8,} {mark + format(cost.input_tokens, ','):>10}"
        f" {mark + format(cost.output_tokens, ','):>10} {money:>14}"
        f" {usd(per) if per is not None else '-':>14}"
    )


def _nano(entry: dict[str, Any] | None) -> Decimal:
    if not entry:
        return Decimal(0)
    if isinstance(entry.get("cost_nano"), int):
        return Decimal(entry["cost_nano"]) / 1_000_000_000
    return Decimal(str(entry.get("cost_usd") or 0))


def _change(old: dict[str, Any] | None, now: TestCost | None) -> float | None:
    """Percent change of cost; ``None`` for new or gone tests and a zero baseline."""
    if old is None or now is None:
        return None
    before = _nano(old)
    if before == 0:
        return None
    return float((now.cost - before) / before * 100)


def _marker_budget(marker: pytest.Mark) -> Decimal:
    """The marker's budget; ``ValueError`` (failing the test) when it is not a usable amount."""
    value = marker.kwargs.get("usd", marker.args[0] if marker.args else None)
    if value is None:
        raise ValueError(f"@pytest.mark.{MARKER} needs usd=AMOUNT")
    try:
        budget = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"@pytest.mark.{MARKER}(usd={value!r}): not a number") from None
    if not budget.is_finite() or budget < 0:
        raise ValueError(f"@pytest.mark.{MARKER}(usd={value!r}): must be 0 or more")
    return budget


def _load_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise pytest.UsageError(
            f"--tokentop-baseline: cannot read {path}: {exc.strerror}"
        ) from None
    except ValueError:
        raise pytest.UsageError(f"--tokentop-baseline: {path} is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("tests"), dict):
        raise pytest.UsageError(
            f"--tokentop-baseline: {path} is not a --tokentop-json file (no 'tests')"
        )
    return data
