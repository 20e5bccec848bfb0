"""Rendering the results: the printed table, the JSON file and the chart."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.figures import Config
from bench.hostinfo import header_lines
from bench.model import Figure, Line, Measure
from bench.stats import fmt_ratio, fmt_summary, fmt_value, ratio


def failures_text(m: Measure) -> str:
    if not m.failures:
        return ""
    total = len(m.failures) + len(m.samples)
    return f"  ({len(m.failures)} of {total} runs failed: {m.failures[0]})"


def measure_text(m: Measure) -> str:
    s = m.summary
    return (fmt_summary(m.kind, s) if s else "no data") + failures_text(m)


def headline(fig: Figure, line: Line) -> str:
    """'runm run true: 6.1 s [5.9-6.4]  | bare VM boot 4.3 s (x1.42) | native runc ...'."""
    subject = fig.measures[line.subject]
    s = subject.summary
    parts = [f"{subject.label}: {fmt_summary(subject.kind, s) if s else 'no data'}"]
    for key in line.baselines:
        base = fig.measures[key]
        b = base.summary
        if b is None:
            parts.append(f"{base.name} no data")
            continue
        r = ratio(s.median, b.median, subject.kind) if s else None
        parts.append(f"{base.name} {fmt_value(base.kind, b.median)} ({fmt_ratio(r)})")
    return " | ".join(parts).replace(" | ", "  | ", 1) + failures_text(subject)


def render(info: dict[str, Any], cfg: Config, figures: list[Figure]) -> str:
    out = ["runm bench", *header_lines(info), ""]
    out.append(f"Each figure: median [min-max] of n={cfg.repeat} runs taken in this invocation, "
               f"after {cfg.warmup} uncounted warm-up run{'s' * (cfg.warmup != 1)}.")
    out.append("(xR) = runm's cost relative to that baseline: time and memory runm/baseline, "
               "throughput baseline/runm; >1 means runm is slower or larger.")
    for i, fig in enumerate(figures, 1):
        out.append("")
        out.append(f"{i}. {fig.title}")
        if fig.not_measured is not None:
            out.append(f"   not measured: {fig.not_measured}")
            continue
        done = {ln.subject for ln in fig.lines}
        for line in fig.lines:
            out.append(f"   {headline(fig, line)}")
            for key in (*line.baselines, *line.related):
                if key not in done:
                    done.add(key)
                    out.append(f"     {fig.measures[key].label}: {measure_text(fig.measures[key])}")
        for key, m in fig.measures.items():
            if key not in done:
                out.append(f"     {m.label}: {measure_text(m)}")
        out.extend(f"   - {note}" for note in fig.notes)
    failed = sum(len(m.failures) for f in figures for m in f.measures.values())
    if failed:
        out.append("")
        out.append(f"{failed} run(s) failed; their errors are shown next to the figures above.")
    return "\n".join(out)


def write_json(path: Path, info: dict[str, Any], cfg: Config, figures: list[Figure],
               text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"host": info, "config": asdict(cfg), "figures": [f.as_dict() for f in figures],
           "report": text}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def draw_chart(path: Path, info: dict[str, Any], figures: list[Figure]) -> str | None:
    """Draw one panel per measured figure; return why not if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    panels = [f for f in figures if f.not_measured is None and f.lines]
    if not panels:
        return "nothing measured"
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 1.2 * len(panels) * 2),
                             squeeze=False)
    for ax, figure in zip(axes[:, 0], panels, strict=True):
        keys: list[str] = []
        for line in figure.lines:
            keys.extend(k for k in (line.subject, *line.baselines) if k not in keys)
        measures = [(figure.measures[k]) for k in keys]
        shown = [m for m in measures if m.summary is not None]
        if not shown:
            ax.set_title(f"{figure.title} (no data)", fontsize=8, loc="left")
            ax.set_axis_off()
            continue
        meds = [m.summary.median for m in shown if m.summary]
        lo = [m.summary.median - m.summary.lo for m in shown if m.summary]
        hi = [m.summary.hi - m.summary.median for m in shown if m.summary]
        colors = ["tab:red" if "runm" in m.label and "native" not in m.label else "tab:gray"
                  for m in shown]
        y = list(range(len(shown)))
        ax.barh(y, meds, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(y, [shorten(m.label, 48) for m in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(shown[0].kind.value, fontsize=8)
        ax.set_title(textwrap.fill(figure.title, 110), fontsize=8, loc="left")
        for yi, m in zip(y, shown, strict=True):
            assert m.summary is not None
            ax.text(m.summary.hi, yi, "  " + fmt_value(m.kind, m.summary.median),
                    va="center", fontsize=7)
        ax.margins(x=0.15)
    fig.suptitle(f"runm bench {info.get('date', '')}  accel={info.get('accel', '?')}  "
                 f"{info.get('cpu_model', '')} x{info.get('cores', '?')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
