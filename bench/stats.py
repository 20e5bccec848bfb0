"""Statistics and formatting: pure functions, no I/O (unit-tested by the smoke test)."""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


class Kind(enum.Enum):
    """What a measure is, which fixes its unit and which direction is better."""

    TIME = "s"  # seconds, lower is better
    RATE = "MB/s"  # 10^6 bytes per second, higher is better
    MEMORY = "MiB"  # mebibytes, lower is better
    PERCENT = "%"  # e.g. CPU use as % of one core, lower is better
    REQUESTS = "req/s"  # requests per second, higher is better

    @property
    def higher_is_better(self) -> bool:
        return self in (Kind.RATE, Kind.REQUESTS)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated samples (p25/p75: inclusive quartiles)."""

    n: int
    median: float
    lo: float
    hi: float
    p25: float
    p75: float
    mean: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples")
    values = sorted(float(s) for s in samples)
    if len(values) >= 2:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        p25 = p75 = values[0]
    return Summary(n=len(values), median=statistics.median(values), lo=values[0],
                   hi=values[-1], p25=p25, p75=p75, mean=statistics.fmean(values))


def ratio(subject: float, baseline: float, kind: Kind) -> float | None:
    """runm's cost relative to a baseline: >1 means runm is slower / larger.

    Times and memory: subject / baseline. Throughput: baseline / subject.
    """
    if subject <= 0 or baseline <= 0 or not (math.isfinite(subject) and math.isfinite(baseline)):
        return None
    return baseline / subject if kind.higher_is_better else subject / baseline


def sig(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, never in exponent notation."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    rounded = round(value, decimals)
    if rounded == 0:
        return f"{value:g}"
    # rounding may have added a digit (9.996 -> 10.0): recompute from the rounded value
    decimals = max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)
    return f"{rounded:.{decimals}f}"


def fmt_ratio(value: float | None) -> str:
    return "x?" if value is None else f"x{sig(value)}"


def time_scale(seconds: float) -> tuple[float, str]:
    """Factor and unit that show `seconds` readably (s, ms or µs)."""
    magnitude = abs(seconds)
    if magnitude >= 1 or magnitude == 0:
        return 1.0, "s"
    if magnitude >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def scale_for(kind: Kind, value: float) -> tuple[float, str]:
    if kind is Kind.TIME:
        return time_scale(value)
    return 1.0, kind.value


def fmt_value(kind: Kind, value: float) -> str:
    factor, unit = scale_for(kind, value)
    return f"{sig(value * factor)} {unit}"


def fmt_summary(kind: Kind, summary: Summary) -> str:
    """'6.10 s [5.90-6.40]': median, then min-max in the median's unit."""
    factor, unit = scale_for(kind, summary.median)
    spread = f"[{sig(summary.lo * factor)}-{sig(summary.hi * factor)}]"
    return f"{sig(summary.median * factor)} {unit} {spread}"


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else math.inf


def parse_int_list(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (positive, de-duplicated, in the given order)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        n = int(part)
        if n <= 0:
            raise ValueError(f"not a positive integer: {part}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("empty list")
    return out


def slowest(phases: dict[str, float]) -> tuple[str, float] | None:
    """The phase with the largest duration."""
    if not phases:
        return None
    name = max(phases, key=lambda k: phases[k])
    return name, phases[name]


def median_phases(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-phase median over runs, in first-seen phase order (a phase absent from a run is
    taken over the runs that have it)."""
    order: list[str] = []
    for run in runs:
        order.extend(k for k in run if k not in order)
    return {k: statistics.median([run[k] for run in runs if k in run]) for k in order}
