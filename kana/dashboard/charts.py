"""Bar charts drawn as inline SVG on the server: no JavaScript, no chart library, no CDN."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: float


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    left: int
    bottom: float
    top: int
    bars: list[Bar] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    x_labels: list[tuple[float, str]] = field(default_factory=list)
    total: float = 0

    @property
    def empty(self) -> bool:
        return not any(b.value for b in self.bars)


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 × 10ⁿ at or above ``value`` (axis maxima people can read)."""
    if value <= 0:
        return 1
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value:
            return candidate
    return 10 ** (exponent + 1)  # pragma: no cover - the loop always returns


def number(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def bar_chart(points: Sequence[tuple[str, float]], *, width: int = 1100, height: int = 220,
              labels: int = 8) -> Chart:
    """Lay out one bar per point; negative values (reverted usage) hang below the zero line."""
    left, top, bottom_margin = 48, 8, 22
    plot_w, plot_h = width - left - 4, height - top - bottom_margin
    values = [float(v) for _, v in points]
    hi = nice_ceiling(max([0.0, *values]))
    lo = -nice_ceiling(-min(values)) if values and min(values) < 0 else 0.0
    span = hi - lo
    zero = top + plot_h * hi / span
    chart = Chart(width=width, height=height, left=left, bottom=top + plot_h, top=top, total=sum(values))
    if not points:
        return chart
    slot = plot_w / len(points)
    gap = min(2.0, slot * 0.2)
    for i, (label, value) in enumerate(points):
        h = plot_h * abs(value) / span
        y = zero - h if value >= 0 else zero
        chart.bars.append(Bar(x=round(left + i * slot + gap / 2, 2), y=round(y, 2), width=round(slot - gap, 2),
                              height=round(h, 2), label=label, value=value))
    for frac in (0, 0.5, 1):
        v = lo + span * frac
        chart.ticks.append(Tick(y=round(top + plot_h * (1 - frac), 2), label=number(v)))
    every = max(1, math.ceil(len(points) / labels))
    chart.x_labels = [(round(left + i * slot + slot / 2, 2), label)
                      for i, (label, _) in enumerate(points) if i % every == 0]
    return chart
