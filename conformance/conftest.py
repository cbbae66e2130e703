"""The pytest plugin of the suite: options, subject and dtype parametrization, recording, summary."""

from __future__ import annotations

import random
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import Phase, settings

from conformance import divergences, profiles, quantization, recording, threads
from conformance.dtypes import BY_NAME as DTYPES
from conformance.subjects import CATALOGUE, Subject, select, versions

NO_SUBJECT = "no-selected-subject"
RECORDER = pytest.StashKey[recording.Recorder]()
STATE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "MLX LoRA conformance")
    group.addoption(
        "--subject",
        action="append",
        default=[],
        metavar="NAME",
        help="a subject to check (repeatable): " + ", ".join(s.name for s in CATALOGUE)
        + "; a pattern such as 'mlx_vlm.*'; or module:attribute of a Subject; default: all",
    )
    group.addoption(
        "--dtype", action="append", default=[], choices=list(DTYPES), help="a case dtype to check (repeatable); default: all"
    )
    group.addoption("--mlx-device", choices=["cpu", "gpu"], default=None, help="MLX device; default: gpu where Metal is available, else cpu")
    group.addoption(
        "--threads",
        default=None,
        metavar="N",
        help=f"threads per process for torch, BLAS and OpenMP, or '{threads.NATIVE}' (the libraries' own defaults); "
        f"default: ${threads.ENVIRONMENT}, else {threads.DEFAULT}",
    )
    group.addoption("--results", default="results/conformance.json", metavar="PATH", help="JSON results file (default: %(default)s)")
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
    config.addinivalue_line("markers", "family(name): the layer family a test module checks")
    config.addinivalue_line("markers", "check(name): the check a test runs, where its name does not say")
    config.addinivalue_line("markers", "dtypes(*names): the only case dtypes a check runs in, where not all")
    device = _select_device(config.getoption("mlx_device"))
    try:
        subjects = select(config.getoption("subject")) or list(CATALOGUE)
        known = divergences.load(Path(config.getoption("known_divergences")), device)
    except (LookupError, OSError, divergences.DivergenceFileError) as error:
        raise pytest.UsageError(str(error)) from None
    results = Path(config.getoption("results"))
    report = None if config.getoption("report") == "none" else Path(config.getoption("report"))
    if not hasattr(config, "workerinput"):
        outputs = [("--results", results)] + ([("--report", report), ("--report", report.with_suffix(".md"))] if report else [])
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
    recorder.meta = recording.run_meta(meta["versions"], meta["device"], profiles.active(), _seed_description(config), subjects)
    recorder.meta["threads"] = _threads_meta(config.stash[STATE])


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
        f"conformance: MLX device {meta['device']} ({mx.default_device()}); Hypothesis profile {meta['profile']}, seed {meta['seed']}",
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
    for subject in (s for s in state["subjects"] if s.family == family):
        reason = subject.not_provided_reason()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params += [pytest.param(subject, DTYPES[d], id=f"{subject.name}-{d}", marks=marks) for d in dtypes]
    if not params and only is not None and any(s.family == family for s in state["subjects"]):
        reason = f"this check runs in {', '.join(only.args)} only, which --dtype did not select"
        params = [pytest.param(None, None, id=NO_SUBJECT, marks=pytest.mark.skip(reason=reason))]
    metafunc.parametrize(("subject", "dtype"), params or [pytest.param(None, None, id=NO_SUBJECT)])


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
    """Drop the checks of families no selected subject belongs to; mark known divergences."""
    families = {subject.family for subject in config.stash[STATE]["subjects"]}
    unused = [item for item in items if _family(item) not in families]
    if unused:
        config.hook.pytest_deselected(items=unused)
        items[:] = [item for item in items if _family(item) in families]
    known = config.stash[STATE]["known"]
    for item in items:
        entry = divergences.find(known, check_id(item))
        if entry is not None:
            item.add_marker(pytest.mark.xfail(reason=f"known divergence: {entry.reason}", strict=False))


@pytest.fixture(scope="session")
def recorder(pytestconfig: pytest.Config) -> recording.Recorder:
    return pytestconfig.stash[RECORDER]


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.config.stash[RECORDER].check_id = check_id(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Run a known divergence without Hypothesis' shrink phase.

    Its first failing case is recorded and replayable, and its reason is already written down;
    shrinking it again on every run took a third of the ci profile's time. New failures are shrunk.
    """
    test = getattr(item, "obj", None)
    own = getattr(test, "_hypothesis_internal_use_settings", None)  # Hypothesis reads it at call time
    if own is None or divergences.find(item.config.stash[STATE]["known"], check_id(item)) is None:
        yield
        return
    test._hypothesis_internal_use_settings = settings(own, phases=[p for p in own.phases if p != Phase.shrink])
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = own


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        state = item.config.stash[STATE]
        params = item.callspec.params if hasattr(item, "callspec") else {}
        state["checks"].append(
            {
                "check_id": check_id(item),
                "subject": str(params.get("subject")),
                "dtype": str(params.get("dtype")),
                "check": _check_name(item),
                "status": _status(report, divergences.find(state["known"], check_id(item))),
                "longrepr": _longrepr(report),
            }
        )


def _longrepr(report: pytest.TestReport) -> str:
    """What a failure printed, or why a check was skipped (the subject is not provided); empty when it passed."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr) if report.failed or hasattr(report, "wasxfail") else ""


def _status(report: pytest.TestReport, known: divergences.KnownDivergence | None) -> str:
    if report.skipped and not hasattr(report, "wasxfail"):
        return "not provided"
    if known is not None:
        if report.passed:
            return "missed this run" if known.sometimes else "now passing"
        return "known divergence"
    return "pass" if report.passed else "fail"


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    recorder, state = config.stash[RECORDER], config.stash[STATE]
    if hasattr(config, "workeroutput"):
        threads_now = threads.in_force()  # at the end, so a library that reset its pool mid-run would show
        config.workeroutput["conformance"] = {"rows": recorder.rows, "checks": state["checks"], "threads": threads_now}
        return
    recorder.meta["threads"] = _threads_meta(state)
    covered: dict[str, list[dict]] = {}
    for check in state["checks"]:
        entry = divergences.find(state["known"], check["check_id"])
        if entry is not None:
            covered.setdefault(entry.check_id, []).append(check)
    state["divergences"] = [_divergence_status(e, covered.get(e.check_id, [])) for e in state["known"].values()]
    recorder.meta["finished"] = recording.now()
    document = recording.write(state["results"], recorder.meta, recorder.rows, state["checks"], state["divergences"])
    if state["report"] is not None:
        from reports import publish, results  # matplotlib and Jinja2 load only when a report is written

        rendered = results.merge([document], [str(state["results"])])  # what `python -m reports` reads from the file
        publish.write(rendered, state["report"], state["report"].with_suffix(".md"))


def _divergence_status(entry: divergences.KnownDivergence, checks: list[dict]) -> dict:
    """An entry's checks that ran, and whether any still diverges ("now passing" once none does)."""
    statuses = {c["status"] for c in checks}
    status = next(
        (s for s in ("known divergence", "now passing", "missed this run") if s in statuses),
        "not provided" if checks else "not run",
    )
    return {
        "check_id": entry.check_id,
        "reason": entry.reason,
        "status": status,
        "now_passing": sorted(c["check_id"] for c in checks if c["status"] == "now passing"),
    }


def pytest_testnodedown(node, error) -> None:
    output = getattr(node, "workeroutput", {}).get("conformance")
    if output:
        state = node.config.stash[STATE]
        node.config.stash[RECORDER].rows.extend(output["rows"])
        state["checks"].extend(output["checks"])
        state["threads_in_force"][node.workerinput["workerid"]] = output["threads"]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    recorder, state = config.stash[RECORDER], config.stash[STATE]
    rows = recorder.rows
    failing = sum(1 for r in rows if r["verdict"] == "fail")
    counts: dict[str, int] = {}
    for check in state["checks"]:
        counts[check["status"]] = counts.get(check["status"], 0) + 1
    write = terminalreporter.write_line
    now_passing = [c for d in state.get("divergences", []) for c in d["now_passing"]]
    if now_passing:
        terminalreporter.section("known divergences that now pass")
        for check in now_passing:
            write(f"{check}: passes now; remove it (or narrow its pattern) in the known-divergences file")
    policy = state["threads"]
    for process, measured in sorted(state["threads_in_force"].items()):
        off = threads.departures(policy, measured)
        if off:
            write(f"conformance: threads in {process} were not {policy.threads} as asked: {', '.join(off)}")
    checks = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    write(
        f"conformance: {len(rows)} cases checked ({failing} outside the allowed error); "
        f"checks: {checks or 'none'}; results: {state['results']}"
        + (f"; report: {state['report']}" if state["report"] else "")
    )
