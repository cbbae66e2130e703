"""The HTML parity report: one self-contained file (styles and figures inline, no network) rendered from results."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import jinja2

from foundation.schema import CheckRecord, Row, Status
from reports import figures, repro, verdict_study
from reports.root_causes import root_causes
from reports.results import (
    NO_SUBJECT,
    Results,
    dtypes_in,
    module_check,
    most_severe_first,
    short_status,
    subject_label,
)

LONGREPR_LINES = 12
"""The tail of a failure's pytest report shown where no recorded case explains it (an exception, say)."""


@dataclass
class Detail:
    """One subject's one check (``module:check``) over its parametrizations: a matrix cell's target."""

    subject: str
    name: str
    anchor: str
    items: list[dict] = field(default_factory=list)
    """The test items: check_id, dtype, status, cases, failing cases, largest margin, card anchor."""

    @cached_property
    def statuses_by_dtype(self) -> dict[str, list[Status]]:
        by_dtype: dict[str, set[Status]] = defaultdict(set)
        for item in self.items:
            by_dtype[item["dtype"]].add(item["status"])
        return {dtype: most_severe_first(statuses) for dtype, statuses in by_dtype.items()}

    @property
    def status(self) -> Status:
        return most_severe_first({i["status"] for i in self.items})[0]


def anchor(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "--".join(parts)).strip("-")


def _card(check: CheckRecord, row: Row | None, subjects: dict) -> dict:
    card = {
        "anchor": anchor("card", check.label, check.check_id),
        "check_id": check.check_id,
        "subject": subject_label(check),
        "status": check.status,
        "row": row,
        "case": json.dumps(row.case, indent=1) if row else "",
        "longrepr": "\n".join(check.longrepr.splitlines()[-LONGREPR_LINES:]),
        "systematic": [p["description"] for p in check.systematic if p.get("verdict") in ("fail", "known divergence")],
    }
    if row is not None:
        card["replay"] = repro.replay_command(check, row)
        reason = repro.unsupported_reason(row, subjects.get(row.subject))
        card["script"] = repro.script(row, subjects[row.subject]) if reason is None else ""
        card["no_script"] = reason or ""
    return card


def _details(
    results: Results, failing_rows: dict[tuple[int, str], Row]
) -> tuple[dict[tuple[str, str], Detail], list[dict], list[dict]]:
    """Each subject's checks with their parametrizations; the failure cards and the known divergences' cards."""
    cases: dict[tuple[int, str], list[Row]] = defaultdict(list)
    for row in results.rows:
        cases[(row.run, row.check_id)].append(row)
    details: dict[tuple[str, str], Detail] = {}
    cards, divergent = [], []
    for check in results.checks:
        if check.subject == NO_SUBJECT:
            continue
        subject, name = subject_label(check), module_check(check.check_id, check.check)
        detail = details.setdefault((subject, name), Detail(subject, name, anchor("detail", subject, name)))
        rows = cases[(check.run, check.check_id)]
        margins = [r.margin for r in rows if r.margin is not None]
        item = {
            "check_id": check.check_id,
            "dtype": check.dtype,
            "status": check.status,
            "cases": len(rows),
            "failing": sum(r.failed for r in rows),
            "largest_margin": max(margins, default=None),
            "card": "",
        }
        if check.status in (Status.FAIL, Status.KNOWN_DIVERGENCE, Status.NOW_PASSING):
            subjects = results.runs[check.run].get("subjects", {})
            card = _card(check, failing_rows.get((check.run, check.check_id)), subjects)
            (cards if check.status == Status.FAIL else divergent).append(card)
            item["card"] = card["anchor"]
        detail.items.append(item)
    return details, cards, divergent


def _matrix(details: dict[tuple[str, str], Detail], order: list[str]) -> dict[str, dict]:
    """Per test module: its checks (the columns) and, per subject (the rows), the detail of each check; the
    modules in `order` (the families' order, which the run recorded), any other after them by name."""
    modules: dict[str, dict] = {}
    for (subject, name), detail in sorted(details.items()):
        module, _, check = name.partition(":")
        table = modules.setdefault(module, {"checks": [], "subjects": {}})
        if check not in table["checks"]:
            table["checks"].append(check)
        table["subjects"].setdefault(subject, {})[check] = detail
    rank = {module: i for i, module in enumerate(order)}
    return dict(sorted(modules.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _causes(results: Results, failing_rows: dict[tuple[int, str], Row], cards: list[dict]) -> list[dict]:
    """The failing checks by root cause: each with its representative's card and the cards of all its checks."""
    by_anchor = {card["anchor"]: card for card in cards}
    failing = [check for check in results.checks if check.status == Status.FAIL and check.subject != NO_SUBJECT]
    causes = []
    for cause in root_causes(failing, failing_rows):
        card = by_anchor[anchor("card", cause.representative.label, cause.representative.check_id)]
        members = [(c.check_id, anchor("card", c.label, c.check_id)) for c in cause.checks]
        causes.append({"cause": cause, "card": card, "checks": members, "names": cause.check_names()})
    return causes


def view(results: Results) -> dict:
    """Everything the template shows, computed from the results alone."""
    failing_rows = results.failing_case_by_check()
    details, cards, divergent = _details(results, failing_rows)
    by_check: dict[str, list[Row]] = defaultdict(list)
    for row in results.rows:
        by_check[module_check(row.check_id, row.check)].append(row)
    return {
        "runs": results.runs,
        "cases": results.cases,
        "failing_cases": len(results.failing_rows()),
        "counts": results.status_counts(),
        "dtypes": dtypes_in(results.checks),
        "modules": _matrix(details, next((run["modules"] for run in results.runs if "modules" in run), [])),
        "details": [details[key] for key in sorted(details)],
        "cards": cards,
        "causes": _causes(results, failing_rows, cards),
        "divergent": divergent,
        "known_divergences": sorted(
            results.known_divergences, key=lambda d: (d.status != Status.NOW_PASSING, d.check_id)
        ),
        "figures": {name: figures.check_figure(rows, name) for name, rows in sorted(by_check.items())},
        "figure_anchors": {name: anchor("figure", name) for name in by_check},
        "study": verdict_study.load(),
    }


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["margin"] = lambda m: "–" if m is None else f"{m:.3g}"
    environment.filters["short_status"] = short_status
    environment.filters["css"] = lambda s: s.replace(" ", "-")
    return environment


def render(results: Results) -> str:
    return _environment().get_template("report.html.j2").render(**view(results))
