"""The TOML config: a full valid example, and one-line errors naming every bad value."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tokentop.collectors.config import (
    Config,
    ConfigError,
    InferenceEndpoint,
    default_config_path,
    default_db_path,
    load_config,
    parse_config,
)
from tokentop.collectors.sources import build_sources, provider_enabled
from tokentop.pricing.book import ModelPriceOverride
from tokentop.pricing.gpu import GpuRate

FULL = """
budget_daily_usd = 50
budget_monthly_usd = "1200.50"
refresh_s = 0.5
nvml = false
gpu_interval_s = 2
compare_to = "gpt-4o"

[pricing.discount]
openai = 0.1

[[pricing.model]]
provider = "acme"
model = "acme-llm-70b-ft"
input_per_mtok = 1.5
output_per_mtok = "4.5"
cache_read_per_mtok = 0.15
cache_write_per_mtok = 1.875
cache_write_1h_per_mtok = 3
web_search_per_k = 10
effective = 2025-06-01

[[pricing.model]]
model = "my-other-model"
input_per_mtok = 0
output_per_mtok = 0
effective = "2025-07-01T12:00:00+02:00"

[openai]
enabled = true
key_env = "MY_OPENAI_KEY"
base_url = "http://127.0.0.1:8080"
interval_s = 120
backfill_hours = 48
costs = false

[anthropic]
enabled = false

[[gpu]]
match = "H100"
usd_per_hour = 2.5

[[gpu]]
match = "*"
mode = "owned"
usd_per_hour = 0.8
usd_per_kwh = 0.2
pue = 1.3

[[inference]]
url = "http://127.0.0.1:8000/metrics"
kind = "vllm"
gpus = [0, 1]
name = "llama"

[[inference]]
url = "https://gpu-box.internal:9400/metrics"
max_response_mb = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_example_parses(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    c = load_config(path)
    assert c.path == path
    assert c.budget_daily_usd == Decimal(50)
    assert c.budget_monthly_usd == Decimal("1200.50")
    assert c.refresh_s == 0.5
    assert c.nvml is False
    assert c.gpu_interval_s == 2.0
    assert c.compare_to == "gpt-4o"
    assert c.pricing.discounts == {"openai": Decimal("0.1")}
    assert c.pricing.models == (
        ModelPriceOverride(
            provider="acme",
            model="acme-llm-70b-ft",
            input_per_mtok=Decimal("1.5"),
            output_per_mtok=Decimal("4.5"),
            cache_read_per_mtok=Decimal("0.15"),
            cache_write_per_mtok=Decimal("1.875"),
            cache_write_1h_per_mtok=Decimal(3),
            web_search_per_k=Decimal(10),
            effective=datetime(2025, 6, 1, tzinfo=UTC),
        ),
        ModelPriceOverride(
            provider="",
            model="my-other-model",
            input_per_mtok=Decimal(0),
            output_per_mtok=Decimal(0),
            effective=datetime(2025, 7, 1, 10, tzinfo=UTC),
        ),
    )
    assert c.openai.enabled is True
    assert c.openai.key_env == "MY_OPENAI_KEY"
    assert c.openai.base_url == "http://127.0.0.1:8080"
    assert c.openai.interval_s == 120.0
    assert c.openai.backfill_hours == 48.0
    assert c.openai.costs is False
    assert c.anthropic.enabled is False
    assert c.anthropic.key_env == "ANTHROPIC_ADMIN_KEY"
    assert c.anthropic.costs is True
    assert c.gpu_rates == (
        GpuRate("H100", Decimal("2.5")),
        GpuRate("*", Decimal("0.8"), mode="owned", usd_per_kwh=Decimal("0.2"), pue=Decimal("1.3")),
    )
    assert c.inference == (
        InferenceEndpoint("http://127.0.0.1:8000/metrics", "vllm", (0, 1), "llama"),
        InferenceEndpoint("https://gpu-box.internal:9400/metrics", max_response_mb=0.5),
    )


def test_defaults_without_a_file(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml") == Config()
    assert load_config(None) == Config()  # the platform default does not exist in tests
    c = parse_config({})
    assert c.budget_daily_usd is None
    assert c.openai.interval_s == 60.0 and c.openai.backfill_hours == 24.0
    assert c.nvml is None and c.inference == () and c.gpu_rates == ()


def test_key_comes_from_the_named_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = load_config(write(tmp_path, FULL))
    assert c.openai.key == ""
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-admin-test")
    assert c.openai.key == "sk-admin-test"
    assert provider_enabled(parse_config({}).openai) is False
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-test")
    assert provider_enabled(parse_config({}).openai) is True
    assert provider_enabled(parse_config({"openai": {"enabled": False}}).openai) is False


def test_paths_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENTOP_CONFIG", str(tmp_path / "c.toml"))
    monkeypatch.setenv("TOKENTOP_DB", str(tmp_path / "t.db"))
    assert default_config_path() == tmp_path / "c.toml"
    assert default_db_path() == tmp_path / "t.db"
    assert default_db_path(demo=True).name == "demo.db"
    assert default_db_path(demo=True).parent != tmp_path
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(None)  # named by the environment, so its absence is an error
    assert str(tmp_path / "c.toml") in str(err.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load_config(path, explicit=True)
    assert str(err.value) == f"config file not found: {path}"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "budget_daily_usd = = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in message
    assert "\n" not in message


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"compare_to = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match=r"cannot be read|not valid TOML") as err:
        load_config(path)
    assert "\n" not in str(err.value)


BAD: list[tuple[str, str]] = [
    ("budget_daly_usd = 5", "'budget_daly_usd'"),
    ("budget_daily_usd = -1", "budget_daily_usd must be a non-negative number, got -1"),
    ("budget_monthly_usd = 'lots'", "budget_monthly_usd must be a number, got 'lots'"),
    ("budget_daily_usd = true", "budget_daily_usd must be a number, got True"),
    ("budget_daily_usd = nan", "budget_daily_usd must be a non-negative number, got nan"),
    ("budget_daily_usd = [1]", "budget_daily_usd must be a number, got [1]"),
    ("refresh_s = 0", "refresh_s must be a positive number, got 0"),
    ("refresh_s = '1'", "refresh_s must be a positive number, got '1'"),
    ("gpu_interval_s = -2.5", "gpu_interval_s must be a positive number, got -2.5"),
    ("nvml = 'yes'", "nvml must be true or false, got 'yes'"),
    ("compare_to = 5", "compare_to must be a string, got 5"),
    ("pricing = 5", "pricing must be a table, got 5"),
    ("[pricing]\ndiscount = 0.1", "pricing.discount must be a table, got 0.1"),
    ("[pricing.discount]\nopenai = 1", "pricing.discount.openai is a fraction below 1, got 1"),
    ("[pricing.discount]\nopenai = 1.5", "pricing.discount.openai is a fraction below 1, got 1.5"),
    ("[pricing.discount]\nopenai = -0.1", "pricing.discount.openai must be a non-negative"),
    (
        "[[pricing.model]]\ninput_per_mtok = 1\noutput_per_mtok = 1",
        "pricing.model[0] needs 'model'",
    ),
    ("[[pricing.model]]\nmodel = 'x'\noutput_per_mtok = 1", "needs 'input_per_mtok'"),
    (
        "[[pricing.model]]\nmodel = ''\ninput_per_mtok = 1\noutput_per_mtok = 1",
        "model must be a name, got ''",
    ),
    (
        "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = -1\noutput_per_mtok = 1",
        "pricing.model[0].input_per_mtok must be a non-negative number, got -1",
    ),
    (
        "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1\n"
        "cache_read_per_mtok = 'x'",
        "pricing.model[0].cache_read_per_mtok must be a number, got 'x'",
    ),
    (
        "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1\n"
        "effective = 'soon'",
        "pricing.model[0].effective is not a date: 'soon'",
    ),
    (
        "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1\neffective = 5",
        "pricing.model[0].effective is not a date: 5",
    ),
    ("openai = 'on'", "openai must be a table, got 'on'"),
    ("[openai]\nbackfill_hours = 721", "openai.backfill_hours is at most 720 (30 days), got 721"),
    ("[anthropic]\nbackfill_hours = 1000", "anthropic.backfill_hours is at most 720"),
    ("[openai]\nbackfill_hours = 0", "backfill_hours must be a positive number, got 0"),
    ("[openai]\nbase_url = 'ftp://x'", "openai.base_url must be an http(s) URL, got 'ftp://x'"),
    ("[openai]\nenabled = 1", "enabled must be true or false, got 1"),
    ("[openai]\ninterval_s = 'fast'", "interval_s must be a positive number, got 'fast'"),
    ("[openai]\nkey_env = 3", "key_env must be a string, got 3"),
    ("[openai]\ncosts = 'no'", "costs must be true or false, got 'no'"),
    (
        "[[gpu]]\nusd_per_hour = 1\nmode = 'leased'",
        "gpu.mode must be 'rented' or 'owned', got 'leased'",
    ),
    ("[[gpu]]\nmatch = 'H100'", "a [[gpu]] table needs usd_per_hour"),
    ("[[gpu]]\nusd_per_hour = -3", "gpu.usd_per_hour must be a non-negative number, got -3"),
    ("[[gpu]]\nusd_per_hour = 1\npue = 'high'", "gpu.pue must be a number, got 'high'"),
    ("[[gpu]]\nusd_per_hour = 1\nusd_per_kwh = -0.1", "gpu.usd_per_kwh must be a non-negative"),
    ("gpu = 5", "gpu must be a table or an array of tables, got 5"),
    ("gpu = [1, 2]", "gpu must be a table or an array of tables, got [1, 2]"),
    ("[[inference]]\nkind = 'vllm'", "inference.url must be an http(s) URL, got None"),
    (
        "[[inference]]\nurl = 'localhost:8000'",
        "inference.url must be an http(s) URL, got 'localhost:8000'",
    ),
    (
        "[[inference]]\nurl = 'http://127.0.0.1'\ngpus = [0, -1]",
        "inference.gpus must be a list of GPU indices, got [0, -1]",
    ),
    (
        "[[inference]]\nurl = 'http://127.0.0.1'\ngpus = 0",
        "inference.gpus must be a list of GPU indices, got 0",
    ),
    (
        "[[inference]]\nurl = 'http://127.0.0.1'\ngpus = [true]",
        "inference.gpus must be a list of GPU indices, got [True]",
    ),
    (
        "[[inference]]\nurl = 'http://127.0.0.1'\nmax_response_mb = 9000",
        "inference.max_response_mb must be from 0.01 to 4096, got 9000",
    ),
    (
        "[[inference]]\nurl = 'http://127.0.0.1'\nkind = 'ollama'",
        "inference.kind 'ollama' is not one of vllm",
    ),
    # Interval floors: a provider's API at most every 30 s, a local source every 0.2 s.
    ("refresh_s = 0.05", "refresh_s must be at least 0.1 seconds, got 0.05"),
    ("gpu_interval_s = 0.1", "gpu_interval_s must be at least 0.2 seconds, got 0.1"),
    ("[openai]\ninterval_s = 1e-9", "openai.interval_s must be at least 30 seconds, got 1e-09"),
    ("[anthropic]\ninterval_s = 29.5", "anthropic.interval_s must be at least 30 seconds"),
    # GPU and price values in range.
    ("[[gpu]]\nusd_per_hour = 1\npue = 0", "gpu.pue must be from 1 to 3, got 0"),
    ("[[gpu]]\nusd_per_hour = 1\npue = 0.9", "gpu.pue must be from 1 to 3, got 0.9"),
    ("[[gpu]]\nusd_per_hour = 1\npue = 30", "gpu.pue must be from 1 to 3, got 30"),
    ("[[gpu]]\nusd_per_hour = 1\npue = nan", "gpu.pue must be a non-negative number, got nan"),
    ("[[gpu]]\nusd_per_hour = inf", "gpu.usd_per_hour must be a non-negative number, got inf"),
    ("[[gpu]]\nusd_per_hour = 1e12", "gpu.usd_per_hour must be at most 1,000,000,000"),
    ("[[gpu]]\nusd_per_hour = '1e400'", "gpu.usd_per_hour must be at most 1,000,000,000"),
    ("[[gpu]]\nusd_per_hour = 1\nusd_per_kwh = -inf", "gpu.usd_per_kwh must be a non-negative"),
    ("budget_daily_usd = 1e30", "budget_daily_usd must be at most 1,000,000,000, got 1e+30"),
    (
        "[[pricing.model]]\nprovider = 5\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1",
        "pricing.model[0].provider must be a string, got 5",
    ),
    (
        "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = inf",
        "pricing.model[0].output_per_mtok must be a non-negative number, got inf",
    ),
    ("[[pricing.tier]]\ntier = 'flex'\nshare_of_list = -0.5", "share_of_list must be a non-neg"),
    ("[openai]\nmax_response_mb = 0", "openai.max_response_mb must be a positive number, got 0"),
    ("[anthropic]\nmax_response_mb = 1e6", "anthropic.max_response_mb must be from 0.01 to 4096"),
    ("[retention]\nhours_days = 1e12", "retention.hours_days must be at most 36500, got 1000000"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[t for t, _ in BAD])
def test_bad_values_give_one_line_errors_naming_them(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_parse_config_without_a_path_says_config() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"refresh": 1})
    assert str(err.value) == "config: unknown setting 'refresh'"


NOT_CAUGHT: list[tuple[dict[str, Any], str]] = [
    ({"refresh_s": float("nan")}, "refresh_s"),
    ({"openai": {"interval_s": float("nan")}}, "interval_s"),
    ({"gpu_interval_s": float("inf")}, "gpu_interval_s"),
]


@pytest.mark.parametrize(("raw", "name"), NOT_CAUGHT, ids=[n for _, n in NOT_CAUGHT])
def test_non_finite_intervals_are_rejected(raw: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        parse_config(raw)


UNKNOWN_NESTED = [
    "[openai]\nintervall_s = 30",
    "[anthropic]\nbackfil_hours = 5",
    "[[gpu]]\nusd_per_hour = 1\nmatches = 'H100'",
    "[[inference]]\nurl = 'http://127.0.0.1:8000'\ngpu = [0]",
    "[[pricing.model]]\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1\noutput_mtok = 2",
    "[pricing]\ndiscounts = { openai = 0.1 }",
]


@pytest.mark.parametrize("text", UNKNOWN_NESTED)
def test_unknown_keys_in_sections_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_config(tomllib.loads(text))


def test_provider_errors_name_the_section() -> None:
    with pytest.raises(ConfigError, match=r"anthropic\.interval_s"):
        parse_config({"anthropic": {"interval_s": -1}})


def test_demo_sources_need_no_keys() -> None:
    sources = build_sources(Config(), demo=True, interval_s=0.5)
    assert [(s.name, s.kind, s.interval_s) for s in sources] == [
        ("demo", "demo", 0.5),
        ("demo-gpu", "demo", 0.5),
    ]


def test_nothing_configured_builds_no_api_sources() -> None:
    assert build_sources(Config(nvml=False)) == []


def test_the_floors_and_bounds_themselves_are_accepted() -> None:
    c = parse_config(
        tomllib.loads(
            "refresh_s = 0.1\ngpu_interval_s = 0.2\n[openai]\ninterval_s = 30\n"
            "[[gpu]]\nusd_per_hour = 0\npue = 1\n[[gpu]]\nmatch = 'H100'\nusd_per_hour = 2\n"
            "pue = 3\n"
        )
    )
    assert (c.refresh_s, c.gpu_interval_s, c.openai.interval_s) == (0.1, 0.2, 30.0)
    assert [r.pue for r in c.gpu_rates] == [1, 3]
