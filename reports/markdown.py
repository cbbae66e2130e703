"""The Markdown summary of a run, for a CI job summary: what ran, what failed and why, what changed."""

from __future__ import annotations

from foundation.schema import CheckRecord, Row, Status
from reports import matrix
from reports.regression import Comparison, compare
from reports.repro import replay_command
from reports.results import Results, subject_label
from reports.root_causes import RootCause, diagnosis, root_causes

FAILURE_LIMIT = 30
"""Failures listed one by one; the rest are counted (the HTML report has them all)."""


def _versions(run: dict) -> str:
    versions = " · ".join(
        f"{name} {run['versions'].get(name) or 'not installed'}"
        for name in ("mlx", "mlx-vlm", "mlx-lm", "peft", "torch")
    )
    label = f"**{run['label']}**: " if run.get("label") else ""
    profile, seed = run.get("profile", "–"), run.get("seed", "–")
    return f"{label}{versions} · MLX device {run['device']} · profile {profile} · seed {seed}"


def render(results: Results, report_path: str = "", comparison: Comparison | None = None) -> str:
    """The summary; with a `comparison` against a base run, failures are split into new ones and old ones."""
    comparison = comparison or compare(results)
    failing_rows = results.failing_case_by_check()
    statuses = ", ".join(f"{n} {status}" for status, n in results.status_counts().items())
    lines = ["## MLX LoRA conformance", ""]
    lines += [f"- {_versions(run)}" for run in results.runs]
    if comparison.base is not None:
        lines += [f"- base: {_versions(run)}" for run in comparison.base.runs]
    lines += [
        "",
        f"**{results.cases} cases** checked, {len(results.failing_rows())} outside the allowed error. "
        f"Checks: {statuses or 'none'}.",
        "",
    ]
    failed = comparison.new_failures
    lines += _failures("New failures", failed, failing_rows) if failed else ["### No new failure"]
    if comparison.failing_in_base_too:
        old = _failures("Failing in the base too", comparison.failing_in_base_too, failing_rows)
        lines += ["", f"{old[0]} (not counted against this change)", *old[1:]]
    if comparison.fixed:
        lines += ["", f"### Fixed since the base: {len(comparison.fixed)}", ""]
        lines += [f"- {subject_label(c)} `{c.check_id}`" for c in comparison.fixed]
    if comparison.saved_adapters_changed:
        changed = comparison.saved_adapters_changed
        lines += ["", f"### Saved adapters change meaning: {len(changed)}", ""]
        lines += [
            "These checks of saved adapter files changed verdict against the base: an adapter saved with the base "
            "gives another function with this change (say so to users, or convert their files).",
            "",
        ]
        lines += [f"- `{c.check_id}`: {'now fails' if c.status == Status.FAIL else 'now passes'}" for c in changed]
    if comparison.no_longer_provided:
        lines += [
            "",
            f"### No longer provided: {len(comparison.no_longer_provided)} (ran in the base; did a class move or go?)",
            "",
        ]
        lines += ["<details><summary>the checks</summary>", ""]
        lines += [f"- `{c.check_id}`: {_reason(c)}" for c in comparison.no_longer_provided]
        lines += ["", "</details>"]
    if comparison.now_passing_divergences:
        lines += ["", "### Known divergences that now pass (drop or narrow their entries)", ""]
        lines += [
            f"- `{check}`" + (f" ({d.label})" if d.label else "")
            for d in comparison.now_passing_divergences
            for check in d.now_passing
        ]
    known = [d for d in results.known_divergences if d.status == Status.KNOWN_DIVERGENCE]
    if known:
        lines += ["", f"<details><summary>Known divergences seen this run: {len(known)}</summary>", ""]
        lines += [f"- `{d.check_id}` `{d.explains}` ({d.explained} explained)" + f": {d.reason}" for d in known]
        lines += ["", "</details>"]
    lines += ["", "<details><summary>Subject × check matrix</summary>", "", matrix.render(results), "</details>"]
    if report_path:
        lines += ["", f"Full report: `{report_path}`"]
    return "\n".join(lines) + "\n"


def _failures(title: str, checks: list[CheckRecord], failing_rows: dict[tuple[int, str], Row]) -> list[str]:
    """A heading with the counts; each root cause with the case that shows it and the checks it fails; then every
    check, folded away."""
    causes = root_causes(checks, failing_rows)
    lines = [f"### {title}: {len(checks)} check(s), {len(causes)} root cause(s)"]
    for number, cause in enumerate(causes, 1):
        lines += ["", *_cause_lines(number, cause)]
    lines += ["", f"<details><summary>every failing check ({len(checks)})</summary>", ""]
    lines += _failure_table(checks, failing_rows)
    return lines + ["", "</details>"]


def _cause_lines(number: int, cause: RootCause) -> list[str]:
    check, row = cause.representative, cause.row
    lines = [f"#### {number}. {cause.subject}: {cause.cause} ({len(cause.checks)} check(s))", ""]
    lines.append(f"- shown on `{check.check_id}`{_figures(row)}: {_cell(cause.diagnosis)}")
    lines.append(f"- checks: {'; '.join(cause.check_names())}")
    if row is not None:
        lines += ["", "```sh", replay_command(check, row), "```"]
    return lines


def _figures(row: Row | None) -> str:
    """The failing case's worst comparison's error and allowed error (the comparison a diagnosis quotes)."""
    if row is None or row.max_error is None or row.judged_at is None:  # no value compared (it raised, say)
        return ""
    allowed = "–" if row.allowed_error is None else f"{row.allowed_error:.3g}"
    return f" (error {row.max_error:.3g}, allowed {allowed})"


def _failure_table(checks: list[CheckRecord], failing_rows: dict[tuple[int, str], Row]) -> list[str]:
    """The failing checks' table (observed, allowed, diagnosis), FAILURE_LIMIT of them."""
    lines = ["| subject | check id | observed | allowed | diagnosis |", "|---|---|---|---|---|"]
    lines += [_failure_line(check, failing_rows.get((check.run, check.check_id))) for check in checks[:FAILURE_LIMIT]]
    if len(checks) > FAILURE_LIMIT:
        lines.append(f"\n…and {len(checks) - FAILURE_LIMIT} more (all in the HTML report).")
    return lines


def _reason(check: CheckRecord) -> str:
    return _cell((check.longrepr.strip().splitlines() or ["not provided"])[-1])


def _failure_line(check: CheckRecord, row: Row | None) -> str:
    """A table row: the failing check, its worst element's error and allowed error, and the diagnosis."""
    observed = allowed = "–"
    if row is not None:
        observed, allowed = (f"{v:.3g}" if v is not None else "–" for v in (row.max_error, row.allowed_error))
    return f"| {subject_label(check)} | `{check.check_id}` | {observed} | {allowed} | {_cell(diagnosis(check, row))} |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
