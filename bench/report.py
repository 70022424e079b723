"""Markdown for the results: one table per scenario, then the goals, met or missed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Goal:
    name: str
    target: str
    value: str
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("**met**" if self.met else "**missed**")


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        out += [f"{n}" for n in self.notes]
        if self.notes:
            out.append("")
        if self.rows:
            out.append("| " + " | ".join(self.header) + " |")
            out.append("|" + "|".join(" --- " for _ in self.header) + "|")
            out += ["| " + " | ".join(r) + " |" for r in self.rows]
            out.append("")
        return "\n".join(out)


def rate(v: float) -> str:
    """Events/s, readable."""
    if math.isnan(v):
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def goals_markdown(goals: list[Goal]) -> str:
    out = [
        "## Goals",
        "",
        "| goal | target | measured (median) | verdict |",
        "| --- | --- | --- | --- |",
    ]
    out += [f"| {g.name} | {g.target} | {g.value} | {g.verdict} |" for g in goals]
    return "\n".join(out) + "\n"
