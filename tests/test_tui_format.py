"""Money, token, share and age formatting."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tokentop.tui import format as fmt


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1234.56"), "$1,234.56"),
        (Decimal("1234567.891"), "$1,234,567.89"),
        (Decimal("0.42"), "$0.42"),
        (Decimal("0.008"), "$0.008"),
        (Decimal("0.0135"), "$0.0135"),
        (Decimal("0.4237"), "$0.424"),
        (Decimal("0.9999"), "$1.00"),
        (Decimal("0.00042"), "$0.00042"),
        (Decimal(0), "$0.00"),
        (Decimal("-3.5"), "-$3.50"),
        (None, "—"),
        (12, "$12.00"),
    ],
)
def test_usd(value: Decimal | None, text: str) -> None:
    assert fmt.usd(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.00042"), "$0.000420"),
        (Decimal("0.000416666"), "$0.000417"),
        (Decimal("0.0123"), "$0.0123"),
        (Decimal("0.5"), "$0.500"),
        (Decimal("1.234"), "$1.23"),
        (Decimal("2500"), "$2,500.00"),
        (Decimal(0), "$0"),
        (None, "—"),
    ],
)
def test_usd_unit_keeps_three_significant_digits(value: Decimal | None, text: str) -> None:
    assert fmt.usd_unit(value) == text


def test_signed_and_rates() -> None:
    assert fmt.usd_signed(Decimal("1.2")) == "+$1.20"
    assert fmt.usd_signed(Decimal("-0.35")) == "-$0.35"
    assert fmt.usd_signed(Decimal(0)) == "$0.00"
    assert fmt.usd_rate(Decimal("12.345")) == "$12.35/h"
    assert fmt.usd_rate(None) == "—"
    assert fmt.rate(11.94) == "11.9/s"
    assert fmt.rate(0.05) == "0.05/s"
    assert fmt.rate(1234.0, "") == "1,234"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (950, "950"),
        (2.5, "2.5"),
        (1000, "1.00k"),
        (12_345, "12.3k"),
        (123_456, "123k"),
        (999_999, "1.00M"),
        (4_560_000, "4.56M"),
        (2_000_000_000, "2.00B"),
        (None, "—"),
    ],
)
def test_tokens(value: int | None, text: str) -> None:
    assert fmt.tokens(value) == text


def test_counts_shares_changes() -> None:
    assert fmt.count(1234567) == "1,234,567"
    assert fmt.pct(0.423) == "42%"
    assert fmt.pct(0.042) == "4.2%"
    assert fmt.pct(0) == "0%"
    assert fmt.pct(None) == "—"
    assert fmt.change(0.12) == "▲ 12%"
    assert fmt.change(-0.3) == "▼ 30%"
    assert fmt.change(0.0) == "= 0%"
    assert fmt.change(None) == "—"


def test_ages_and_durations() -> None:
    assert fmt.age(0.2) == "now"
    assert fmt.age(3) == "3s"
    assert fmt.age(12 * 60 + 5) == "12m"
    assert fmt.age(5 * 3600) == "5h"
    assert fmt.age(3 * 86400) == "3d"
    assert fmt.age(-5) == "now"
    assert fmt.duration_h(0.75) == "45m"
    assert fmt.duration_h(6.2) == "6.2h"
    assert fmt.duration_h(76) == "3d 4h"


def test_bar() -> None:
    assert fmt.bar(0.5, 4) == "██  "
    assert fmt.bar(1.5, 3) == "███"
    assert fmt.bar(None, 2) == "  "
    assert fmt.bar(1 / 16, 2) == "▏ "
    assert len(fmt.bar(0.37, 10)) == 10
