"""Write a run's reports: the HTML report and the Markdown summary, both from the results alone."""

from __future__ import annotations

from pathlib import Path

from reports import html, markdown
from reports.regression import Comparison
from reports.results import Results


def write(results: Results, html_path: Path, markdown_path: Path, comparison: Comparison | None = None) -> None:
    html_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(html.render(results), encoding="utf-8")
    markdown_path.write_text(
        markdown.render(results, report_path=str(html_path), comparison=comparison), encoding="utf-8"
    )
