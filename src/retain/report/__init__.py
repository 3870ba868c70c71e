"""The demo report: aggregate the runs of a directory, check the papers' findings, draw the figures, and write
``DIR/report.html`` (self-contained), ``DIR/report.md`` (the findings table) and ``DIR/report_files/`` (the PNGs and
``summary.json``, the aggregate and findings as data)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build_report"]


def build_report(root: str | Path) -> Path:
    """Build the report of the demo (or plain run) directory ``root``; returns the path of ``report.html``."""
    from retain.files import atomic_write_json
    from retain.report.aggregate import aggregate
    from retain.report.findings import findings
    from retain.report.html import write_html, write_markdown
    from retain.report.matched import learned_table, matched_findings
    from retain.report.plots import FILES, all_figures

    root = Path(root)
    agg = aggregate(root)
    agg["learned"] = learned_table(agg)
    agg["matched"] = matched_findings(agg)  # the verdicts; ``fs`` (operating points) is description
    fs = findings(agg)
    figures = all_figures(agg, root)
    summary = {k: v for k, v in agg.items() if k != "tokens"}
    summary["findings"] = fs
    summary["figures"] = {k: str(p.relative_to(root)) for k, p in figures}
    atomic_write_json(root / FILES / "summary.json", summary)
    outputs = [write_markdown(root, agg, fs), write_html(root, agg, fs, figures), root / FILES / "summary.json"]
    for path in outputs + [p for _, p in figures]:
        os.chmod(path, 0o644)  # atomic writes go through mkstemp (0600); a report is meant to be shared
    return outputs[1]
