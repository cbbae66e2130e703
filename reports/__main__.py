"""Render results files as the HTML report and the Markdown summary: ``python -m reports results/*.json``.

Several files merge into one report: those of one configuration (xdist workers, shards, repeated
runs) into the same matrix, those of different package versions side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports import publish
from reports.results import ResultsError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results files written by pytest conformance")
    parser.add_argument(
        "--html", type=Path, default=None, help="the HTML report (default: report.html beside the first results file)"
    )
    parser.add_argument(
        "--markdown", type=Path, default=None, help="the Markdown summary (default: the HTML's path with .md)"
    )
    args = parser.parse_args(argv)
    html = args.html or args.results[0].with_name("report.html")
    markdown = args.markdown or html.with_suffix(".md")
    try:
        results = load(args.results)
        publish.write(results, html, markdown)
    except ResultsError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"cannot write {error.filename}: {error.strerror}")
    print(
        f"{html} ({html.stat().st_size / 1e6:.2f} MB), {markdown}: "
        f"{results.cases} cases from {len(args.results)} file(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
