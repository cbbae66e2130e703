"""Results files: read what ``pytest conformance`` recorded, check it, and merge several into one.

Files from the same configuration (package versions and MLX device) merge into one set of
subjects, whether they come from xdist workers, shards or repeated runs. Files from different
configurations (the latest mlx-vlm and 0.4.4, say) stay apart: each subject is labelled with what
differs, so a matrix never mixes two releases in one cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from foundation import schema
from foundation.schema import CHECK_SEVERITY, ENTRY_SEVERITY, FORMAT, CheckRecord, DivergenceRecord, Row, Status

DTYPE_ORDER = ("float32", "float16", "bfloat16")
NO_SUBJECT = "None"
"""A check recorded without a subject (a property of MLX itself, e.g. its quantized matmul)."""


class ResultsError(ValueError):
    """A results file that cannot be read or is not one the suite wrote."""


@dataclass
class Results:
    runs: list[dict]
    """Each file's ``meta``: versions, device, profile, seed, dates; plus ``file`` and ``label``."""
    rows: list[Row] = field(default_factory=list)
    """One per measured case; each carries ``run``, the index of its file in `runs`."""
    checks: list[CheckRecord] = field(default_factory=list)
    """One per test item (a check of a subject in a dtype), with its status; with ``run`` and ``label``."""
    known_divergences: list[DivergenceRecord] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return len(self.rows)

    def failing_rows(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    def status_counts(self) -> dict[Status, int]:
        """How many checks ended in each status, most severe first."""
        counts: dict[Status, int] = {}
        for check in self.checks:
            counts[check.status] = counts.get(check.status, 0) + 1
        return {status: counts[status] for status in most_severe_first(set(counts))}

    def failing_case_by_check(self) -> dict[tuple[int, str], Row]:
        """Per test item (run, check id), the row that shows its failure: Hypothesis' final, shrunk one, else the
        first."""
        by_check: dict[tuple[int, str], list[Row]] = {}
        for row in self.failing_rows():
            by_check.setdefault((row.run, row.check_id), []).append(row)
        return {key: schema.showing_case(rows) for key, rows in by_check.items()}


def configuration(meta: dict) -> tuple:
    return (tuple(sorted((meta.get("versions") or {}).items())), meta.get("device"))


def _labels(metas: list[dict]) -> list[str]:
    """A short label per file: the versions (and device) in which its configuration differs from the others'."""
    configurations = {configuration(m) for m in metas}
    if len(configurations) < 2:
        return [""] * len(metas)
    names = sorted({name for m in metas for name in (m.get("versions") or {})})
    differing = [n for n in names if len({(m.get("versions") or {}).get(n) for m in metas}) > 1]
    labels = []
    for meta in metas:
        parts = [f"{n} {(meta.get('versions') or {}).get(n) or 'not installed'}" for n in differing]
        if len({m.get("device") for m in metas}) > 1:
            parts.append(f"MLX {meta.get('device')}")
        labels.append(", ".join(parts))
    return labels


def read(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text())
    except OSError as error:
        raise ResultsError(f"{path}: cannot read: {error.strerror or error}") from None
    except ValueError as error:
        raise ResultsError(f"{path}: not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ResultsError(f"{path}: not a results file of format {FORMAT} (written by pytest conformance)")
    missing = [key for key in schema.PARTS if key not in document]
    if missing:
        raise ResultsError(f"{path}: incomplete results file, missing {', '.join(missing)}")
    return document


def merge(documents: list[dict], files: list[str] | None = None) -> Results:
    """One `Results` from several results documents (see the module's docstring)."""
    if not documents:
        raise ResultsError("no results file given")
    files = files or [""] * len(documents)
    metas = [dict(d["meta"], file=str(f)) for d, f in zip(documents, files)]
    for meta, label in zip(metas, _labels(metas)):
        meta["label"] = label
    results = Results(runs=metas)
    seen_divergences: dict[tuple[str, str, str], DivergenceRecord] = {}
    for index, document in enumerate(documents):
        try:
            _, rows, checks, entries = schema.parse(document, run=index, label=metas[index]["label"])
        except schema.SchemaError as error:
            raise ResultsError(f"{files[index] or 'a results document'}: not of this suite's schema: {error}") from None
        results.rows += rows
        results.checks += checks
        for entry in entries:
            key = (entry.check_id, entry.explains, entry.label)
            previous = seen_divergences.get(key)
            if previous is None or ENTRY_SEVERITY.index(entry.status) < ENTRY_SEVERITY.index(previous.status):
                seen_divergences[key] = entry
    results.known_divergences = list(seen_divergences.values())
    return results


def load(paths: list[Path]) -> Results:
    return merge([read(p) for p in paths], [str(p) for p in paths])


def subject_label(item: Row | CheckRecord) -> str:
    """A row's or check's subject, with its configuration's label where several configurations merged."""
    return f"{item.subject} ({item.label})" if item.label else item.subject


def module_check(check_id: str, check: str) -> str:
    """``linear:forward`` for ``test_linear.py::test_forward[...]``: how reports name a check across subjects."""
    module = check_id.partition("::")[0]
    return f"{module.removeprefix('test_').removesuffix('.py')}:{check}"


def most_severe_first(statuses: set[Status]) -> list[Status]:
    """The order a cell lists the statuses of its parametrizations in."""
    return [s for s in CHECK_SEVERITY if s in statuses] + sorted(statuses - set(CHECK_SEVERITY))


def short_status(status: Status) -> str:
    """A status as a narrow cell shows it."""
    return "known div." if status == Status.KNOWN_DIVERGENCE else str(status)


def ordered_dtypes(names) -> list[str]:
    """float32, float16, bfloat16 first, in that order; any other name after them."""
    return sorted(names, key=lambda d: (DTYPE_ORDER.index(d) if d in DTYPE_ORDER else len(DTYPE_ORDER), d))


def dtypes_in(checks: list[CheckRecord]) -> list[str]:
    return ordered_dtypes({c.dtype for c in checks if c.dtype != NO_SUBJECT})


def inner_dimension(case: dict) -> int | None:
    """The length of the case's longest sum: in_features (Linear, experts), dims for an embedding (its head)."""
    return case.get("in_features") or case.get("dims")
