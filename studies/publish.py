"""Publish the studies: ``python -m studies.publish`` reads ``studies/results/`` and writes
``docs/verdict-study.md`` (the numbers, with the commands that produced them),
``reports/verdict_study.json`` (the same figures, which every HTML report shows) and the summary
in docs/verdict.md (between its markers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jinja2

from conformance import families
from conformance.families import BASES
from foundation.dtypes import CASE_DTYPES
from studies.detection import PERTURBATIONS, VISIBLE_SHARE
from studies.sampling import KINDS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
DOCUMENT = ROOT / "docs" / "verdict-study.md"
FIGURES = ROOT / "reports" / "verdict_study.json"
SUMMARY_PAGE = ROOT / "docs" / "verdict.md"
"""The page that shows the studies' summary between its `MARKERS` (the README links to it)."""
MARKERS = (
    "<!-- verdict-study summary: written by python -m studies.publish -->",
    "<!-- end of the verdict-study summary -->",
)
FAMILIES = tuple(name for name, family in families.FAMILIES.items() if family.layout != "model")
"""The layer families: whole models have a verdict of their own, and a page of their own (docs/model-verdict.md)."""
DTYPES = tuple(dtype.name for dtype in CASE_DTYPES)
VERDICT_TIGHTENED = "2026-12-01"
"""The day of the last change to the verdict that could raise a correct layer's margin (the scale's
charge, ``verdict.scaling_roundings``): results measured before it are marked as the earlier verdict's."""

RUN_TARGETS = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-5}
"""Per dtype, the relative error of forward's LoRA term (a wrong scale) that a ci run should catch in 99% of runs."""


class ResultError(ValueError):
    """A result file that lacks what publishing needs."""


def _load(path: Path) -> dict:
    document = json.loads(path.read_text())
    if "measured" not in document:
        raise ResultError(f"{path} does not say when it was measured ('measured': 'YYYY-MM-DD')")
    document["earlier_verdict"] = document["measured"] < VERDICT_TIGHTENED
    document.setdefault("base", "float")  # measured before studies took other bases
    document.setdefault("adapter_dtype", document.get("dtype"))  # measured before adapters were drawn in float32
    document["adapters"] = "" if document["adapter_dtype"] == document.get("dtype") else document["adapter_dtype"]
    document.setdefault("known_divergences", [])
    document.setdefault("quantizations", {})
    if "subject" in document:  # a study of layers, not of catch rates or repeated runs
        document["release"] = not document["subject"].startswith("catalogue:")  # an installed package's layer
    return document


def _ordered(documents: list[dict]) -> list[dict]:
    def rank(d: dict) -> tuple:
        return (
            *(
                order.index(d[key]) if d[key] in order else 99
                for key, order in (("family", FAMILIES), ("base", BASES), ("kind", KINDS), ("dtype", DTYPES))
            ),
            d.get("release", False),  # the correct layer's studies first, whatever the files' names
        )

    return sorted(documents, key=rank)


def studies(results: Path = RESULTS) -> dict:
    """Every study's result files, loaded (a study that has not been run is empty)."""
    found = {
        "false_alarms": _ordered([_load(p) for p in sorted((results / "false_alarms").glob("*.json"))]),
        "detection": _ordered([_load(p) for p in sorted((results / "detection").glob("*.json"))]),
        "earlier": json.loads((results / "earlier.json").read_text()) if (results / "earlier.json").exists() else [],
    }
    for document in found["false_alarms"]:
        for tally in document["checks"].values():
            tally.setdefault("not_judgeable", 0)  # measured before checks could leave cases out: each ran
    for name in ("catch_rates", "flakiness"):
        path = results / f"{name}.json"
        found[name] = _load(path) if path.exists() else None
    return found


def figures(found: dict) -> dict:
    """The figures every report shows (``reports/verdict_study.json``)."""
    false_alarms = [
        {
            "what": f"{d['subject']}, every check of the {d['family']} family on a {d['base']} base "
            f"({d['kind']} cases{', ' + d['adapters'] + ' adapters' if d['adapters'] else ''})",
            "family": d["family"],
            "dtype": d["dtype"],
            "cases": f"{d['cases']:,}",
            "false_alarms": len(d["false_alarms"]),
            "known_divergences": len(d["known_divergences"]),
            "largest_margin": f"{d['largest_margin']:.3f}",
            "measured": d["measured"],
            "command": d["command"],
        }
        for d in found["false_alarms"]
    ] + found["earlier"]
    detection = [
        {
            "family": d["family"],
            "base": d["base"],
            "dtype": d["dtype"],
            "perturbation": name,
            "cases": d["perturbations"][name]["visible_cases"],
            "threshold": f"{d['perturbations'][name]['threshold']:.2g}",
            "looseness": f"{d['perturbations'][name]['looseness_median']:.3g}",
            "measured": d["measured"],
            "command": d["command"],
        }
        for d in found["detection"]
        for name in PERTURBATIONS
    ]
    study = {
        "about": (
            "What the verdict has been measured to do: correct implementations' cases and their largest margin "
            "(false alarms), the smallest relative errors it catches in 99% of cases (detection; `lora`: the LoRA "
            f"term scaled, `base`: the base term scaled, `element`: the output's largest element; over cases whose "
            f"term is at least {VISIBLE_SHARE:.0%} of the output; looseness: that error over the one that moves an "
            "element by one rounding, the median over cases), the catalogue's catch rates and repeated runs. "
            "Each figure names the command that produced it; docs/verdict-study.md explains them."
        ),
        "false_alarms": false_alarms,
        "detection": detection,
    }
    study["catch_rates"] = study["flakiness"] = None  # until measured
    if found["catch_rates"]:
        rows = [r for r in found["catch_rates"]["rows"] if r["measured"]]
        study["catch_rates"] = {
            "variants": len({r["variant"] for r in rows}),
            "configurations": len(rows),
            "lowest_rate": min(r["rate"] for r in rows),
            "seeds": rows[0]["seeds"] if rows else 0,
            "measured": found["catch_rates"]["measured"],
            "command": found["catch_rates"]["command"],
        }
    if found["flakiness"]:
        flaky = found["flakiness"]
        study["flakiness"] = {
            "runs": len(flaky["runs"]),
            "identical": flaky["identical"],
            "measured": flaky["measured"],
            "command": flaky["command"],
        }
    return study


def _largest_unexplained(term: dict) -> float | None:
    """The largest statistic of a term's runs that no known divergence explains; None where a study measured before
    results kept it had runs a known divergence explains (without any, it is the largest of all)."""
    if "largest_unexplained_statistic" in term:
        return term["largest_unexplained_statistic"] or 0.0
    return None if term.get("known_divergences") else term["largest_statistic"] or 0.0


def check_run_alarms(found: dict) -> list[dict]:
    """Per false-alarm result that cut its cases into ci-sized check runs: how many runs, the false alarms among
    them and the largest statistic against its threshold, of all runs and of those no known divergence explains
    (`studies.check_runs`)."""
    rows = []
    for d in found["false_alarms"]:
        terms = [
            (check, key, term) for check, runs in d.get("check_runs", {}).items() for key, term in runs["terms"].items()
        ]
        if not terms:
            continue
        check, key, largest = max(terms, key=lambda t: t[2]["largest_statistic"] or 0.0)
        threshold = next(iter(d["check_runs"].values()))["threshold"]
        unexplained = [_largest_unexplained(t) for _, _, t in terms]
        rows.append(
            {
                "document": d,
                "runs": sum(t["runs"] for _, _, t in terms),
                "false_alarms": sum(t["false_alarms"] for _, _, t in terms),
                "known_divergences": sum(t.get("known_divergences", 0) for _, _, t in terms),
                "largest": largest["largest_statistic"] or 0.0,
                "threshold": threshold,
                "where": f"{check}: {' / '.join(key.split('|')[:2])}",
                "largest_case_ratio": max(t["largest_case_ratio"] or 0.0 for _, _, t in terms),
                "largest_unexplained": None if None in unexplained else max(unexplained),
            }
        )
    return rows


def check_run_detection(found: dict) -> list[dict]:
    """The relative error of each term of each check's quantities that a ci run catches in 99% of runs, per family,
    base, dtype and adapter dtype, beside the per-case threshold of forward's LoRA term where the detection study
    measured it; only the catalogue's correct layers' drawn cases, their adapters drawn as the suite draws them (a
    release's study adds its false alarms, not another row of what its runs would catch; so does a study of float32
    adapters only, whose runs hold more such cases than a ci run's mix of adapter dtypes does).

    Studies of the same stratum under several seeds make one row: their runs add up, and the largest of their 99th
    percentiles is given, which bounds the pooled one (no more than 1% of each study's runs lie above it, so no more
    than 1% of all of them do); their medians are given as a range."""
    per_case = {
        (d["family"], d["base"], d["dtype"], d["adapter_dtype"]): d["perturbations"]["lora"]["threshold"]
        for d in found["detection"]
    }
    rows: dict[tuple, dict] = {}
    for d in found["false_alarms"]:
        if d["kind"] != "drawn" or d["release"] or d["adapters"]:
            continue
        for check, runs in d.get("check_runs", {}).items():
            for key, term in sorted(runs["terms"].items()):
                quantity, name, adapter_dtype = key.split("|")
                if not term["runs"]:
                    continue
                stratum = (d["family"], d["base"], d["dtype"], adapter_dtype, check, quantity, name, runs["size"])
                row = rows.setdefault(
                    stratum,
                    {
                        "document": d,
                        "check": check,
                        "quantity": quantity,
                        "term": name,
                        "adapters": adapter_dtype,
                        "size": runs["size"],
                        "studies": 0,
                        "runs": 0,
                        "q99": 0.0,
                        "median": (float("inf"), 0.0),
                        "per_case": per_case.get(stratum[:4]) if check == "forward" and name == "LoRA term" else None,
                    },
                )
                row["studies"] += 1
                row["runs"] += term["runs"]
                row["q99"] = max(row["q99"], term["detectable_q99"])
                low, high = row["median"]
                row["median"] = (min(low, term["detectable_median"]), max(high, term["detectable_median"]))
    return list(rows.values())


def check_run_targets(rows: list[dict]) -> list[dict]:
    """The rows of `check_run_detection` for forward's LoRA term, each with its dtype's target (`RUN_TARGETS`) and
    whether its runs meet it."""
    targets = []
    for row in rows:
        if (row["check"], row["quantity"], row["term"]) == ("forward", "output", "LoRA term"):
            target = RUN_TARGETS[row["document"]["dtype"]]
            targets.append(row | {"target": target, "met": row["q99"] <= target})
    return targets


def _template(name: str) -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(name)


def _documents(found: dict) -> list[dict]:
    """Every study's result, of every kind."""
    return [*found["false_alarms"], *found["detection"], *(d for d in (found["catch_rates"], found["flakiness"]) if d)]


def environment(found: dict) -> dict | None:
    """What the studies measured with (each records it; they are run on one machine)."""
    return next((d["environment"] for d in _documents(found) if "environment" in d), None)


def totals(found: dict) -> dict:
    documents = found["false_alarms"]
    return {
        "cases": sum(d["cases"] for d in documents),
        "false_alarms": sum(len(d["false_alarms"]) for d in documents),
        "known": sum(len(d["known_divergences"]) for d in documents),
    }


def render(found: dict) -> str:
    """docs/verdict-study.md."""
    quantizations = sorted({kind for d in found["false_alarms"] for kind in d["quantizations"]})
    detection = check_run_detection(found)
    return _template("verdict-study.md.j2").render(
        found=found,
        perturbations=PERTURBATIONS,
        visible_share=VISIBLE_SHARE,
        environment=environment(found),
        tightened=VERDICT_TIGHTENED,
        totals=totals(found),
        check_run_alarms=check_run_alarms(found),
        check_run_detection=detection,
        check_run_targets=check_run_targets(detection),
        quantizations=", ".join(quantizations) or "none measured yet",
        dora_largest=max(
            (d["largest_margin"] for d in found["false_alarms"] if d["family"].startswith("dora_")), default=0.0
        ),
    )


def summary(found: dict) -> str:
    """The summary `SUMMARY_PAGE` shows between its `MARKERS`."""
    return (
        _template("verdict-summary.md.j2")
        .render(
            found=found,
            families=FAMILIES,
            bases=BASES,
            dtypes=DTYPES,
            visible_share=VISIBLE_SHARE,
            tightened=VERDICT_TIGHTENED,
            environment=environment(found),
            measured=max((d["measured"] for d in _documents(found)), default="never"),
            check_runs=check_run_alarms(found),
        )
        .strip()
    )


def with_summary(page: str, written: str) -> str:
    """The page with the summary between its markers replaced."""
    start, end = MARKERS
    if start not in page or end not in page:
        raise ValueError(f"{SUMMARY_PAGE.name} lacks the markers {start} ... {end}")
    before, rest = page.split(start, 1)
    return f"{before}{start}\n{written}\n{end}{rest.split(end, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    found = studies()
    DOCUMENT.parent.mkdir(parents=True, exist_ok=True)
    DOCUMENT.write_text(render(found))
    FIGURES.write_text(json.dumps(figures(found), indent=1) + "\n")
    SUMMARY_PAGE.write_text(with_summary(SUMMARY_PAGE.read_text(), summary(found)))
    print(
        f"wrote {DOCUMENT.relative_to(ROOT)}, {FIGURES.relative_to(ROOT)} and the summary in "
        f"{SUMMARY_PAGE.relative_to(ROOT)} from "
        f"{len(found['false_alarms'])} "
        f"false-alarm and {len(found['detection'])} detection results"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
