"""The pytest plugin of the suite: options, subject and dtype parametrization, recording, summary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import settings

from conformance import asserting, check_run, divergences, families, recording, scheduling, threads
from foundation import memo, profiles, quantization
from foundation.dtypes import BY_NAME as DTYPES
from foundation.schema import CheckRecord, DivergenceRecord, Row, Status, showing_case
from subjects.known import CATALOGUE, Subject, select, versions

NO_SUBJECT = "no-selected-subject"
RECORDER = pytest.StashKey[recording.Recorder]()
STATE = pytest.StashKey[dict]()
CHECK_RUN = pytest.StashKey[check_run.CheckRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "MLX LoRA conformance")
    group.addoption(
        "--subject",
        action="append",
        default=[],
        metavar="NAME",
        help="a subject to check (repeatable): "
        + ", ".join(s.name for s in CATALOGUE)
        + "; a pattern such as 'mlx_vlm.*'; or module:attribute of a Subject; default: all",
    )
    group.addoption(
        "--dtype",
        action="append",
        default=[],
        choices=list(DTYPES),
        help="a case dtype to check (repeatable); default: all",
    )
    group.addoption(
        "--mlx-device",
        choices=["cpu", "gpu"],
        default=None,
        help="MLX device; default: gpu where Metal is available, else cpu",
    )
    group.addoption(
        "--threads",
        default=None,
        metavar="N",
        help=f"threads per process for torch, BLAS and OpenMP, or '{threads.NATIVE}' (the libraries' own defaults); "
        f"default: ${threads.ENVIRONMENT}, else {threads.DEFAULT}",
    )
    group.addoption(
        "--results", default="results/conformance.json", metavar="PATH", help="JSON results file (default: %(default)s)"
    )
    group.addoption(
        "--report",
        default="results/report.html",
        metavar="PATH",
        help="HTML parity report, written after the run with a Markdown summary beside it (PATH with .md); "
        "'none' writes neither (default: %(default)s)",
    )
    group.addoption(
        "--known-divergences",
        default=str(divergences.DEFAULT_PATH),
        metavar="PATH",
        help="file of check ids expected to fail, with reasons (default: the suite's own)",
    )


def _select_device(choice: str | None) -> str:
    metal = mx.metal.is_available()
    choice = choice or ("gpu" if metal else "cpu")
    if choice == "gpu" and not metal:
        raise pytest.UsageError("--mlx-device gpu: this machine has no Metal device; valid here: cpu")
    mx.set_default_device(mx.gpu if choice == "gpu" else mx.cpu)
    return choice


MARKERS = (
    "family(name): the layer family a test module checks",
    "check(name): the check a test runs, where its name does not say",
    "dtypes(*names): the only case dtypes a check runs in, where not all",
)


def register_markers(config: pytest.Config) -> None:
    """The suite's marks (`conformance.family_tests` puts them on every generated test)."""
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)


def _seed_description(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None:
        return f"{seed} (replay with --hypothesis-seed={seed})"
    return "derandomized"


def _give_seed(config: pytest.Config, profile: str) -> None:
    """Give a randomized run a seed of its own, before Hypothesis reads it, so it can be replayed."""
    if hasattr(config, "workerinput"):
        return  # workers get the controller's options, seed included
    if config.getoption("hypothesis_seed", None) is None and not settings.get_profile(profile).derandomize:
        config.option.hypothesis_seed = str(random.randrange(2**32))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    profile = config.getoption("hypothesis_profile", None) or profiles.DEFAULT
    if profile not in profiles.SIZES:
        valid = ", ".join(profiles.SIZES)
        raise pytest.UsageError(f"unknown Hypothesis profile {profile!r}; valid profiles: {valid}")
    _give_seed(config, profile)
    try:
        policy = threads.chosen(config.getoption("threads"))
    except ValueError as error:
        raise pytest.UsageError(f"--threads / ${threads.ENVIRONMENT}: {error}") from None
    in_force = threads.apply(policy)  # before any check runs, in the controller and in every xdist worker
    register_markers(config)
    config.pluginmanager.register(CheckRunVerdict(), "conformance-check-run")
    device = _select_device(config.getoption("mlx_device"))
    try:
        subjects = select(config.getoption("subject")) or list(CATALOGUE)
        known = divergences.load(Path(config.getoption("known_divergences")), device)
    except (LookupError, OSError, divergences.DivergenceFileError) as error:
        raise pytest.UsageError(str(error)) from None
    results = Path(config.getoption("results"))
    report = None if config.getoption("report") == "none" else Path(config.getoption("report"))
    if not hasattr(config, "workerinput"):
        outputs = [("--results", results)] + (
            [("--report", report), ("--report", report.with_suffix(".md"))] if report else []
        )
        for option, path in outputs:
            try:
                recording.check_writable(path)
            except OSError as error:
                raise pytest.UsageError(f"{option} {path}: cannot write: {error.strerror or error}") from None
    config.stash[RECORDER] = recording.Recorder({"versions": versions(), "device": device})
    config.stash[STATE] = {
        "threads": policy,
        "threads_in_force": {_process(config): in_force},
        "subjects": subjects,
        "dtypes": config.getoption("dtype") or list(DTYPES),
        "known": known,
        "results": results,
        "report": report,
        "checks": [],
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    """Complete the run's description once Hypothesis has loaded the chosen profile."""
    config = session.config
    recorder = config.stash[RECORDER]
    meta = recorder.meta
    subjects = {s.name: _subject_meta(s) for s in config.stash[STATE]["subjects"] if s.not_provided_reason() is None}
    recorder.meta = recording.run_meta(
        meta["versions"], meta["device"], profiles.active(), _seed_description(config), subjects
    )
    recorder.meta["threads"] = _threads_meta(config.stash[STATE])
    recorder.meta["modules"] = list(families.MODULE_ORDER)  # the order the report's tables follow


def _process(config: pytest.Config) -> str:
    """This process's name in the results: ``controller``, or the xdist worker's id (``gw0``)."""
    return config.workerinput["workerid"] if hasattr(config, "workerinput") else "controller"


def _threads_meta(state: dict) -> dict:
    """The thread policy and what each process's libraries reported (workers' at their end of the run)."""
    policy = state["threads"]
    return {"policy": policy.threads or threads.NATIVE, "source": policy.source, "in_force": state["threads_in_force"]}


def _subject_meta(subject: Subject) -> dict:
    """Where a subject's class was found, for reports (a standalone reproduction imports it from there)."""
    cls = subject.implementation
    return {
        "module": cls.__module__,
        "class": cls.__qualname__,
        "distribution": subject.distribution,
        "convention": type(subject.convention).__name__,
        "roles": dict(subject.convention.roles),
        "provenance": subject.provenance(),
    }


def pytest_report_header(config: pytest.Config) -> list[str]:
    meta, state = config.stash[RECORDER].meta, config.stash[STATE]
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in meta["versions"].items())
    lines = [
        f"conformance: {versions}",
        f"conformance: MLX device {meta['device']} ({mx.default_device()}); "
        f"Hypothesis profile {meta['profile']}, seed {meta['seed']}",
        f"conformance: {threads.describe(state['threads'], state['threads_in_force'][_process(config)])}",
    ]
    available = ", ".join(map(str, quantization.AVAILABLE))
    missing = ", ".join(map(str, quantization.UNAVAILABLE)) or "none"
    lines.append(f"conformance: quantized bases: {available}; not offered on this device: {missing}")
    for subject in state["subjects"]:
        status = subject.not_provided_reason() or f"provided by {subject.provenance()}"
        lines.append(f"conformance: subject {subject.name}: {status}")
    report = f", report -> {state['report']} and {state['report'].with_suffix('.md')}" if state["report"] else ""
    lines.append(f"conformance: results -> {state['results']}{report}")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every check of a family once per selected subject of that family and per dtype."""
    if "subject" not in metafunc.fixturenames:
        return
    family = metafunc.definition.get_closest_marker("family").args[0]
    state = metafunc.config.stash[STATE]
    only = metafunc.definition.get_closest_marker("dtypes")
    dtypes = [d for d in state["dtypes"] if only is None or d in only.args]
    params = []
    info = _check_info(metafunc.definition, family)
    for subject in (s for s in state["subjects"] if s.family == family):
        reason = subject.not_provided_reason() or (info.not_provided_reason(subject) if info else None)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params += [pytest.param(subject, DTYPES[d], id=f"{subject.name}-{d}", marks=marks) for d in dtypes]
    if not params and only is not None and any(s.family == family for s in state["subjects"]):
        reason = f"this check runs in {', '.join(only.args)} only, which --dtype did not select"
        params = [pytest.param(None, None, id=NO_SUBJECT, marks=pytest.mark.skip(reason=reason))]
    metafunc.parametrize(("subject", "dtype"), params or [pytest.param(None, None, id=NO_SUBJECT)])


def _check_info(definition: pytest.Item, family: str) -> families.CheckInfo | None:
    """The description of the check a test runs (`conformance.families`), where its family has one."""
    described = families.FAMILIES.get(family)
    base = next((b for b in described.bases if b.module == definition.path.name), None) if described else None
    return base.check(_check_name(definition)) if base else None


def _family(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("family")
    return marker.args[0] if marker else None


def _check_name(item: pytest.Item) -> str:
    """The check a test item runs: its ``check`` marker, else its function's name."""
    marker = item.get_closest_marker("check")
    return marker.args[0] if marker else item.originalname.removeprefix("test_")


def check_id(item: pytest.Item) -> str:
    return f"{item.path.name}::{item.name}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the checks of families no selected subject belongs to; put the subjects of a check and dtype next to
    each other (`scheduling.check_group`), in the order of their parameters."""
    families = {subject.family for subject in config.stash[STATE]["subjects"]}
    unused = [item for item in items if _family(item) not in families]
    if unused:
        config.hook.pytest_deselected(items=unused)
        items[:] = [item for item in items if _family(item) in families]
    order = scheduling.group_order([item.nodeid for item in items])
    items.sort(key=lambda item: order[scheduling.check_group(item.nodeid)])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> scheduling.CheckGroupScheduling | None:
    """Under xdist's ``load`` distribution (``-n`` alone), a check's subjects go to one worker together."""
    if config.getvalue("dist") == "load":
        return scheduling.CheckGroupScheduling(config, log)
    return None


@pytest.fixture(scope="session")
def recorder(pytestconfig: pytest.Config) -> recording.Recorder:
    return pytestconfig.stash[RECORDER]


def pytest_runtest_setup(item: pytest.Item) -> None:
    memo.share_cases(scheduling.check_group(item.nodeid))
    recorder = item.config.stash[RECORDER]
    recorder.check_id = check_id(item)
    recorder.entries = divergences.covering(item.config.stash[STATE]["known"], recorder.check_id)
    recorder.first_row = len(recorder.rows)


class CheckRunVerdict:
    """The plugin's part that judges a check run as a whole (`conformance.check_run`), once its test has drawn every
    case: a wrapper around the test's call, so that its failure is the test's."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        __tracebackhide__ = True  # the failure is the message, not this hook's code
        result = yield  # a test that failed raised here already
        recorder = item.config.stash[RECORDER]
        rows = recorder.rows[recorder.first_row :]
        if _family(item) is None or not rows:
            return result
        run = check_run.judge(rows, recorder.entries)
        item.stash[CHECK_RUN] = run
        tally = recorder.explained.setdefault(recorder.check_id, {})
        for _, entry in run.explained:
            tally[entry.line] = tally.get(entry.line, 0) + 1
        if not run.passed:
            raise AssertionError(check_run.message(run, rows, recorder.check_id))
        return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A generated test draws what the other subjects of its group draw (`scheduling.check_group`).

    Hypothesis seeds a derandomized test from its digest, to which its pytest plugin adds the item's id where a
    ``parametrize`` mark is present (the quantization kind's): each subject would draw cases of its own. Here,
    after that plugin and before the test runs, the digest becomes the group's: subjects share their draws,
    dtypes and quantization kinds do not."""
    inner = getattr(getattr(item.obj, "hypothesis", None), "inner_test", None)
    if inner is not None and _family(item) is not None:
        inner._hypothesis_internal_add_digest = scheduling.check_group(check_id(item)).encode()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A check's status: a known divergence when its entries explained every failure (shown as xfailed),
    failed when an entry covering it explained nothing (it should go)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        state, recorder = item.config.stash[STATE], item.config.stash[RECORDER]
        entries = recorder.entries  # the check's, set in pytest_runtest_setup
        explained = recorder.explained.get(check_id(item), {})
        status = _status(report, entries, explained)
        if status == Status.NOW_PASSING:
            report.outcome, report.longrepr = "failed", _not_seen(entries, explained)
        elif status == Status.KNOWN_DIVERGENCE:
            seen = [entry for entry in entries if entry.line in explained]
            report.outcome = "skipped"
            report.wasxfail = "known divergence: " + "; ".join(dict.fromkeys(entry.reason for entry in seen))
        report.user_properties.append((STATUS_PROPERTY, status.value))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        state["checks"].append(
            CheckRecord(
                check_id=check_id(item),
                subject=str(params.get("subject")),
                dtype=str(params.get("dtype")),
                check=_check_name(item),
                status=status,
                explained={str(line): count for line, count in explained.items()},
                longrepr=_longrepr(report),
                systematic=item.stash[CHECK_RUN].records() if CHECK_RUN in item.stash else [],
                judges_saved_adapters=families.judges_saved_adapters(check_id(item), _check_name(item)),
                replay=asserting.row_replay(showing_case(recorder.rows[recorder.first_row :]))
                if status in (Status.FAIL, Status.KNOWN_DIVERGENCE)
                else "",
            )
        )


STATUS_PROPERTY = "conformance status"
"""The report's user property that carries a check's status to the terminal (from an xdist worker too)."""
NAMED = {
    Status.KNOWN_DIVERGENCE: ("known divergence", "x", "KNOWN DIVERGENCE"),
    Status.MISSED_THIS_RUN: ("missed this run", "m", "MISSED THIS RUN"),
    Status.NOT_PROVIDED: ("not provided", "s", "NOT PROVIDED"),
}
"""How pytest's progress and last line name the statuses pytest has no word of its own for (it would say xfailed,
passed and skipped): as the results, the report and the gate do."""


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    status = dict(report.user_properties).get(STATUS_PROPERTY)
    if status is not None and Status(status) in NAMED and report.when in ("setup", "call"):
        return NAMED[Status(status)]
    return None


def _not_seen(entries: list[divergences.KnownDivergence], explained: dict[int, int]) -> str:
    lines = [
        "known divergence not seen in this check: remove the entry (or narrow its pattern; @sometimes if only "
        "some cases reach it) in the known-divergences file"
    ]
    lines += [f"  line {e.line}: {e}  # {e.reason}" for e in entries if not e.sometimes and e.line not in explained]
    return "\n".join(lines)


def _longrepr(report: pytest.TestReport) -> str:
    """What a failure printed, or why a check was skipped (the subject is not provided); empty when it passed."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr) if report.failed or hasattr(report, "wasxfail") else ""


def _status(report: pytest.TestReport, entries: list[divergences.KnownDivergence], explained: dict[int, int]) -> Status:
    if report.skipped:
        return Status.NOT_PROVIDED
    if report.failed:
        return Status.FAIL
    if not entries:
        return Status.PASS
    if any(not entry.sometimes and entry.line not in explained for entry in entries):
        return Status.NOW_PASSING
    return Status.KNOWN_DIVERGENCE if explained else Status.MISSED_THIS_RUN


def pytest_sessionfinish(session: pytest.Session) -> None:
    memo.share_cases(None)
    config = session.config
    recorder, state = config.stash[RECORDER], config.stash[STATE]
    if hasattr(config, "workeroutput"):
        threads_now = threads.in_force()  # at the end, so a library that reset its pool mid-run would show
        # The records as one JSON text: execnet sends a string many times faster than the same nested dicts.
        config.workeroutput["conformance"] = json.dumps(
            {
                "rows": [row.to_json() for row in recorder.rows],
                "checks": [check.to_json() for check in state["checks"]],
                "threads": threads_now,
            }
        )
        return
    recorder.meta["threads"] = _threads_meta(state)
    thorough = recorder.meta["profile"] == "thorough"
    state["divergences"] = [
        _divergence_status(entry, [c for c in state["checks"] if entry.matches(c.check_id)], thorough)
        for entry in state["known"]
    ]
    if any(d.status == Status.NEVER_SEEN for d in state["divergences"]) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    recorder.meta["finished"] = recording.now()
    document = recording.write(state["results"], recorder.meta, recorder.rows, state["checks"], state["divergences"])
    if state["report"] is not None:
        from reports import publish, results  # matplotlib and Jinja2 load only when a report is written

        rendered = results.merge([document], [str(state["results"])])  # what `python -m reports` reads from the file
        publish.write(rendered, state["report"], state["report"].with_suffix(".md"))


def _divergence_status(
    entry: divergences.KnownDivergence, checks: list[CheckRecord], thorough: bool
) -> DivergenceRecord:
    """What an entry explained in the checks it covers that ran: a known divergence where it explained a
    failure; "now passing" where it explained none (the checks failed), or "missed this run" for an
    @sometimes entry, which a thorough run that never sees it ends as "never seen", failing the run."""
    ran = [c for c in checks if c.status != Status.NOT_PROVIDED]
    explained = sum(c.explained.get(str(entry.line), 0) for c in ran)
    unseen = sorted(c.check_id for c in ran if str(entry.line) not in c.explained)
    if not ran:
        status = Status.NOT_PROVIDED if checks else Status.NOT_RUN
    elif explained:
        status = Status.KNOWN_DIVERGENCE
    elif entry.sometimes:
        status = Status.NEVER_SEEN if thorough else Status.MISSED_THIS_RUN
    else:
        status = Status.NOW_PASSING
    return DivergenceRecord(
        check_id=entry.check_id,
        explains=str(entry.explanation),
        line=entry.line,
        reason=entry.reason,
        status=status,
        explained=explained,
        now_passing=[] if entry.sometimes else unseen,
    )


def pytest_testnodedown(node, error) -> None:
    sent = getattr(node, "workeroutput", {}).get("conformance")
    if sent:
        output = json.loads(sent)
        state = node.config.stash[STATE]
        node.config.stash[RECORDER].rows.extend(Row.from_json(row) for row in output["rows"])
        state["checks"].extend(CheckRecord.from_json(check) for check in output["checks"])
        state["threads_in_force"][node.workerinput["workerid"]] = output["threads"]


ROOT_CAUSES = "failures by root cause"
"""The terminal summary's section that names each root cause of the run's failures once (the gate says its own)."""


def _write_root_causes(terminalreporter, checks: list[CheckRecord], rows: list[Row]) -> None:
    """The failing checks grouped by root cause, each with the case that shows it and its replay command."""
    failing = [check for check in checks if check.status == Status.FAIL]
    if not failing:
        return
    from reports.results import Results  # the reports' modules load only when something failed
    from reports.root_causes import root_causes

    causes = root_causes(failing, Results(runs=[], rows=rows, checks=checks).failing_case_by_check())
    terminalreporter.section(f"{ROOT_CAUSES}: {len(causes)} of {len(failing)} failing checks")
    for number, cause in enumerate(causes, 1):
        terminalreporter.write_line(f"{number}. {cause.subject}: {cause.cause} ({len(cause.checks)} check(s))")
        terminalreporter.write_line(f"   fails {'; '.join(cause.check_names())}")
        terminalreporter.write_line(f"   shown on {cause.representative.check_id}: {cause.diagnosis}")
        if cause.representative.replay:
            terminalreporter.write_line(f"   replay: {cause.representative.replay}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    recorder, state = config.stash[RECORDER], config.stash[STATE]
    rows = recorder.rows
    failing = sum(1 for r in rows if r.failed)
    counts: dict[str, int] = {}
    for check in state["checks"]:
        counts[check.status] = counts.get(check.status, 0) + 1
    write = terminalreporter.write_line
    stale = [d for d in state.get("divergences", []) if d.now_passing or d.status == Status.NEVER_SEEN]
    if stale:
        terminalreporter.section("known divergences not seen")
        for d in stale:
            never = d.status == Status.NEVER_SEEN
            where = "in no case of a thorough run" if never else "in " + ", ".join(d.now_passing)
            write(
                f"line {d.line}: {d.check_id} | {d.explains}: not seen {where}; remove it (or narrow its "
                "pattern) in the known-divergences file"
            )
    _write_root_causes(terminalreporter, state["checks"], rows)
    policy = state["threads"]
    for process, measured in sorted(state["threads_in_force"].items()):
        off = threads.departures(policy, measured)
        if off:
            write(f"conformance: threads in {process} were not {policy.threads} as asked: {', '.join(off)}")
    explained = sum(n for check in state["checks"] for n in check.explained.values())
    what = {Status.KNOWN_DIVERGENCE: f" ({explained} failing comparisons, each explained by an entry)"}
    checks = ", ".join(f"{n} {status}{what.get(status, '')}" for status, n in sorted(counts.items()))
    write(
        f"conformance: {len(rows)} cases checked ({failing} outside the allowed error); "
        f"checks: {checks or 'none'}; results: {state['results']}"
        + (f"; report: {state['report']}" if state["report"] else "")
    )
