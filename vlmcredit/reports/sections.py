"""The registry of report sections, keyed by what a run folder contains.

A section builder says which runs it applies to (usually: the run holds a given file) and turns
one run into a `Section` (HTML fragment + figures). The report asks every registered builder
about every run, in registration order, so a new run type (SGUF regions, KAWHI paragraph
weights, ToR/VPPO/entropy masks) slots in as one module with a builder plus one line in
`_BUILTIN_MODULES` (or a call to `register_section` from outside the package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmcredit.reports.figures import Figure
from vlmcredit.reports.loaders import RunInput


@dataclass(frozen=True)
class ReportOptions:
    """What the user can tune about the page."""

    samples: int = 10  # samples shown in full (text + attention maps) per run
    max_tokens: int = 2000  # tokens of one response shown before the visible truncation note
    top_clusters: int = 3  # clusters drawn over the image per sample
    title: str = "vlmcredit report"


@dataclass
class Section:
    """One part of the page, built from one run (or from all runs for the summary)."""

    key: str
    title: str
    anchor: str  # HTML id, unique in the page
    html: str
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class SectionBuilder:
    """`applies(run)` says whether the run holds this kind of result; `build` renders it."""

    key: str
    title: str
    applies: Callable[[RunInput], bool]
    build: Callable[[RunInput, ReportOptions], Section]


# Modules that define the built-in builders (each exposes BUILDER), in page order.
_BUILTIN_MODULES = (
    "vlmcredit.reports.section_heads",
    "vlmcredit.reports.section_anchors",
    "vlmcredit.reports.section_signals",
    "vlmcredit.reports.section_kawhi",
    "vlmcredit.reports.section_compare",
    "vlmcredit.reports.section_checkpoints",
)
_extra: list[SectionBuilder] = []


def register_section(builder: SectionBuilder) -> None:
    """Add a builder after the built-in ones (replacing one with the same key)."""
    _extra[:] = [b for b in _extra if b.key != builder.key]
    _extra.append(builder)


def unregister_section(key: str) -> None:
    """Remove a builder added with `register_section` (built-in ones stay)."""
    _extra[:] = [b for b in _extra if b.key != key]


def registered_sections() -> list[SectionBuilder]:
    """Built-in builders (imported on first use, so `vlmcredit --help` stays fast) + extras."""
    builtin = [importlib.import_module(m).BUILDER for m in _BUILTIN_MODULES]
    keys = {b.key for b in _extra}
    return [b for b in builtin if b.key not in keys] + list(_extra)


def sections_for(run: RunInput) -> list[SectionBuilder]:
    return [b for b in registered_sections() if b.applies(run)]
