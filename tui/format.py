"""Formatting of money, counts, shares and ages for the panes.

Pure functions with no Textual import, so they are easy to test and reuse. ``None`` means "not
known" and is shown as an em dash, never as zero.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

MISSING = "—"
"""What an unknown value looks like."""

_BLOCKS = " ▏▎▍▌▋▊▉█"


def _dec(value: Decimal | float | int) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _sig(value: Decimal, digits: int) -> str:
    """``value`` (positive, below 1) with ``digits`` significant digits, trailing zeros kept."""
    exponent = value.adjusted()  # -4 for 0.00042
    places = max(2, digits - 1 - exponent)
    quantum = Decimal(1).scaleb(-places)
    return f"{value.quantize(quantum, rounding=ROUND_HALF_UP):f}"


def usd(value: Decimal | float | int | None) -> str:
    """A money total: ``$1,234.56``; below a dollar, three significant digits without trailing
    zeros (``$0.42``, ``$0.0135``, ``$0.008``), so that a small figure is never rounded away to
    ``$0.01`` or ``$0.00``."""
    if value is None:
        return MISSING
    v = _dec(value)
    sign = "-" if v < 0 else ""
    v = abs(v)
    if v == 0:
        return "$0.00"
    if v >= 1:
        return f"{sign}${v.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,.2f}"
    text = _sig(v, 3)
    if text == "1.00":
        return f"{sign}$1.00"
    whole, _, frac = text.partition(".")
    return f"{sign}${whole}.{frac.rstrip('0').ljust(2, '0')}"


def usd_unit(value: Decimal | float | int | None) -> str:
    """A unit price ($/request, $/inference): three significant digits below $1 (``$0.00042``,
    ``$0.0123``), cents above (``$1.23``)."""
    if value is None:
        return MISSING
    v = _dec(value)
    sign = "-" if v < 0 else ""
    v = abs(v)
    if v == 0:
        return "$0"
    if v >= 1:
        return f"{sign}${v.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,.2f}"
    return f"{sign}${_sig(v, 3)}"


def usd_signed(value: Decimal | float | int | None) -> str:
    """A difference with its sign: ``+$1.20``, ``-$0.35``, ``$0.00``."""
    if value is None:
        return MISSING
    v = _dec(value)
    if v == 0:
        return "$0.00"
    return ("+" if v > 0 else "-") + usd(abs(v))


def usd_rate(value: Decimal | float | int | None, unit: str = "h") -> str:
    """A burn rate: ``$12.34/h``."""
    return MISSING if value is None else f"{usd(value)}/{unit}"


def tokens(value: int | float | None) -> str:
    """A token count with a k/M/B suffix and three significant digits: ``950``, ``12.3k``,
    ``4.56M``."""
    if value is None:
        return MISSING
    v = float(value)
    sign = "-" if v < 0 else ""
    v = abs(v)
    if v < 1000:
        return f"{sign}{v:.0f}" if v == int(v) or v >= 100 else f"{sign}{v:.1f}"
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= divisor * 0.9995:
            scaled = v / divisor
            if scaled >= 999.5 and suffix != "B":
                continue
            if scaled >= 100:
                return f"{sign}{scaled:.0f}{suffix}"
            if scaled >= 10:
                return f"{sign}{scaled:.1f}{suffix}"
            return f"{sign}{scaled:.2f}{suffix}"
    return f"{sign}{v:.0f}"  # pragma: no cover - unreachable


def count(value: int | None) -> str:
    """An exact count with thousands separators: ``12,345``."""
    return MISSING if value is None else f"{value:,}"


def rate(value: float | None, unit: str = "/s") -> str:
    """A rate such as inferences per second: ``12.3/s``, ``0.05/s``."""
    if value is None:
        return MISSING
    if value >= 100:
        return f"{value:,.0f}{unit}"
    if value >= 10:
        return f"{value:.1f}{unit}"
    return f"{value:.2f}{unit}"


def pct(fraction: float | None) -> str:
    """A share as a percentage: ``42%``, ``4.2%``, ``0.3%``."""
    if fraction is None:
        return MISSING
    p = fraction * 100
    if p == 0:
        return "0%"
    if abs(p) < 10:
        return f"{p:.1f}%"
    return f"{p:.0f}%"


def change(fraction: float | None) -> str:
    """A relative change with an arrow: ``▲ 12%``, ``▼ 30%``, ``= 0%``."""
    if fraction is None:
        return MISSING
    if abs(fraction) < 0.0005:
        return "= 0%"
    arrow = "▲" if fraction > 0 else "▼"
    return f"{arrow} {pct(abs(fraction))}"


def age(seconds: float | None) -> str:
    """A compact age: ``now``, ``3s``, ``12m``, ``5h``, ``3d``."""
    if seconds is None:
        return MISSING
    s = max(0.0, seconds)
    if s < 1:
        return "now"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m"
    if s < 86400:
        return f"{s // 3600:.0f}h"
    return f"{s // 86400:.0f}d"


def duration_h(hours: float | None) -> str:
    """A runway or other span given in hours: ``45m``, ``6.2h``, ``3d 4h``."""
    if hours is None:
        return MISSING
    h = max(0.0, hours)
    if h < 1:
        return f"{h * 60:.0f}m"
    if h < 48:
        return f"{h:.1f}h"
    days = int(h // 24)
    return f"{days}d {h - days * 24:.0f}h"


def bar(fraction: float | None, width: int) -> str:
    """A horizontal bar of ``width`` cells filled to ``fraction`` (clamped to 0..1), in eighths.

    The empty part is spaces, so the caller styles the background if it wants a track.
    """
    if width <= 0:
        return ""
    f = 0.0 if fraction is None else min(1.0, max(0.0, fraction))
    eighths = round(f * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full
    if part and full < width:
        text += _BLOCKS[part]
    return text.ljust(width)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, ending in ``…`` when cut (wide characters count
    two cells)."""
    from rich.cells import cell_len, set_cell_size

    if width <= 0:
        return ""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, width - 1) + "…"
