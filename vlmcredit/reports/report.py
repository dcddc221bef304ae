"""Build the report from run folders and write it: one self-contained HTML file + figure files.

Everything is read, checked and rendered in memory first; only then are files written (figures,
then the HTML, each atomically), so a bad input leaves no partial report behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmcredit.errors import VlmCreditError
from vlmcredit.reports.figures import Figure
from vlmcredit.reports.html import GENERATOR, page
from vlmcredit.reports.loaders import RunInput, load_run, safe_name
from vlmcredit.reports.section_summary import build_summary
from vlmcredit.reports.sections import ReportOptions, Section, sections_for


@dataclass
class Report:
    """A rendered report: the page and every figure (file name -> figure)."""

    html: str
    figures: dict[str, Figure] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also shown at the top of the page


def check_options(options: ReportOptions) -> None:
    if options.samples < 0:
        raise VlmCreditError(f"--samples {options.samples}: must be 0 or more")
    if options.max_tokens < 1:
        raise VlmCreditError(f"--max-tokens {options.max_tokens}: must be at least 1")
    if options.top_clusters < 1:
        raise VlmCreditError(f"--top-clusters {options.top_clusters}: must be at least 1")


def build_report(
    paths: Sequence[Path],
    options: ReportOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Read the runs, build every applicable section, assemble the page."""
    options = options or ReportOptions()
    check_options(options)
    if not paths:
        raise VlmCreditError("no run folders given; pass at least one RUN")
    runs: list[RunInput] = [load_run(Path(p), i + 1) for i, p in enumerate(paths)]
    _refuse_repeats(runs)
    warnings = mixed_checkpoints(runs)
    plan = [(run, builder) for run in runs for builder in sections_for(run)]
    if not plan:
        names = ", ".join(str(r.path) for r in runs)
        raise VlmCreditError(
            f"nothing to report in {names}: no heads.json, anchors.parquet or signals.parquet; "
            "pass probe-heads, anchors or signals runs"
        )
    built: list[Section] = []
    found: dict[str, list[str]] = {}
    for done, (run, builder) in enumerate(plan):
        if progress:
            progress(done, len(plan))
        built.append(builder.build(run, options))
        found.setdefault(run.label, []).append(builder.title)
    if progress:
        progress(len(plan), len(plan))
    summary = build_summary(runs, found, warnings)
    sections = [summary, *built]
    figures: dict[str, Figure] = {}
    for sec, (run, _builder) in zip(built, plan, strict=True):
        for fig in sec.figures:
            figures[_unique(f"{run.label}-{safe_name(fig.name)}", figures)] = fig
    nav = [(s.anchor, s.title) for s in sections]
    footer = f"{len(runs)} run(s), {len(figures)} figure(s)"
    html = page(options.title, nav, [s.html for s in sections], footer)
    return Report(html, figures, sections, warnings)


def _refuse_repeats(runs: Sequence[RunInput]) -> None:
    """The same folder twice would draw every section twice, as if two runs agreed."""
    seen: dict[Path, RunInput] = {}
    for run in runs:
        first = seen.setdefault(run.path.resolve(), run)
        if first is not run:
            raise VlmCreditError(
                f"{run.path}: given twice (as {first.label} and {run.label}); pass each run once"
            )


def mixed_checkpoints(runs: Sequence[RunInput]) -> list[str]:
    """A warning when the runs were made with different model weights: their sections stand
    side by side on one page, which reads as one model unless said."""
    by_weights: dict[str, list[str]] = {}
    for run in runs:
        ck = run.manifest.get("checkpoint")
        sha = ck.get("weights_sha1") if isinstance(ck, dict) else None
        if isinstance(sha, str) and sha:
            name = ck.get("id") or ck.get("path") or "?"
            by_weights.setdefault(sha, []).append(f"{run.label} ({name}, weights {sha[:8]})")
    if len(by_weights) < 2:
        return []
    groups = "; ".join(", ".join(labels) for labels in by_weights.values())
    return [
        f"the runs come from {len(by_weights)} different checkpoints: {groups}; their numbers "
        "are not comparable as one model's (vlmcredit compare --ckpt A --ckpt B compares "
        "checkpoints on the same data)"
    ]


def _unique(stem: str, taken: dict[str, Figure]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name


def check_outputs(out: Path, png_dir: Path) -> None:
    """Fail before any work when the output paths cannot be written, or hold files the report
    did not write (a report of ours, and its figures, are replaced)."""
    if Path(out).is_dir():
        raise VlmCreditError(f"--out {out}: is a folder; give the HTML file to write")
    if Path(out).exists() and not _is_our_report(Path(out)):
        raise VlmCreditError(
            f"--out {out}: exists and is not a vlmcredit report; choose another file name "
            "(a report of ours is replaced)"
        )
    if Path(png_dir).exists() and not Path(png_dir).is_dir():
        raise VlmCreditError(f"--png-dir {png_dir}: is a file; give a folder")
    if Path(png_dir).is_dir():
        others = sorted(p.name for p in Path(png_dir).iterdir() if p.suffix not in (".png", ".svg"))
        if others:
            raise VlmCreditError(
                f"--png-dir {png_dir}: holds files that are not report figures ({others[0]}); "
                "choose another folder"
            )
    if Path(png_dir).resolve() == Path(out).resolve():
        raise VlmCreditError(f"--png-dir {png_dir}: same path as --out; choose another folder")


def _is_our_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return GENERATOR.encode() in head


def write_report(report: Report, out: Path, png_dir: Path) -> list[Path]:
    """Write `<png_dir>/<name>.png` (+ .svg where made) and then `out`; return the paths."""
    from vlmcredit.formats.files import atomic_write_bytes

    out, png_dir = Path(out), Path(png_dir)
    check_outputs(out, png_dir)
    written = []
    for name, fig in report.figures.items():
        atomic_write_bytes(png_dir / f"{name}.png", fig.png)
        written.append(png_dir / f"{name}.png")
        if fig.svg is not None:
            atomic_write_bytes(png_dir / f"{name}.svg", fig.svg)
            written.append(png_dir / f"{name}.svg")
    atomic_write_bytes(out, report.html.encode("utf-8"))
    written.append(out)
    return written


def default_png_dir(out: Path) -> Path:
    """report.html -> report-figures/ beside it."""
    return Path(out).with_name(f"{Path(out).stem}-figures")
