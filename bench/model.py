"""The results: measures (repeated samples of one quantity) grouped into figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.stats import Kind, Summary, summarize


@dataclass
class Measure:
    label: str
    kind: Kind
    samples: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    short: str = ""  # the name next to another measure's headline, if not the label

    @property
    def name(self) -> str:
        return self.short or self.label

    def add(self, value: float | None, error: str | None = None) -> None:
        if error is not None or value is None:
            self.failures.append(error or "no value")
        else:
            self.samples.append(value)

    @property
    def summary(self) -> Summary | None:
        return summarize(self.samples) if self.samples else None

    def as_dict(self) -> dict[str, Any]:
        s = self.summary
        return {"label": self.label, "unit": self.kind.value, "samples": self.samples,
                "failures": self.failures, "summary": s.as_dict() if s else None}


@dataclass
class Line:
    """A headline: one measure next to its baselines, with ratios."""

    subject: str
    baselines: list[str]
    related: list[str] = field(default_factory=list)  # rows printed under the headline


@dataclass
class Figure:
    key: str
    title: str
    measures: dict[str, Measure] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    not_measured: str | None = None

    def measure(self, key: str, label: str, kind: Kind, short: str = "") -> Measure:
        if key not in self.measures:
            self.measures[key] = Measure(label, kind, short=short)
        return self.measures[key]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "not_measured": self.not_measured,
                "measures": {k: m.as_dict() for k, m in self.measures.items()},
                "lines": [{"subject": ln.subject, "baselines": ln.baselines}
                          for ln in self.lines],
                "notes": self.notes, "data": self.data}
