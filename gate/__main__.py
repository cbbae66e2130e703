"""``python -m gate SOURCE [options] [-- pytest options]``: the conformance gate for one package source.

Builds an isolated environment with this suite and SOURCE, runs the suite on the package's subjects
(``--subject 'mlx_vlm.*'``), and writes into --out: ``conformance.json`` (the results), ``junit.xml``,
``report.html``, ``summary.md`` (for a CI job summary) and ``pytest.log``. With --baseline (a base
branch's results file) or --base (a base source, run first), only checks that newly fail fail the
gate. Uses only the standard library, so any Python 3.10+ can run it from a checkout of the suite.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

from gate import NEW_FAILURE, PASSED, SETUP_FAILED, USAGE_ERROR, SetupError, environment, sources

INTERRUPTED = 130
PYTEST_EXITS = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}
SECTION = re.compile(r"^=+ (.*) =+$")
LOGGED_ONLY = ("FAILURES", "ERRORS", "warnings summary", "short test summary info", "failures by root cause")
"""pytest's sections the console leaves to pytest.log: tracebacks, per-test lines and the plugin's root causes
(`conformance.conftest.ROOT_CAUSES`, named here because the gate imports nothing of the suite), which the gate's own
summary says again, against the base."""


class Console:
    """What of pytest's output the console shows: its progress and its own last line, not its tracebacks."""

    def __init__(self) -> None:
        self.logged_only = False
        self.held = 0

    def shows(self, line: str) -> bool:
        header = SECTION.match(line.strip())
        if header:  # a section's title, or pytest's last line (shown)
            self.logged_only = header.group(1).startswith(LOGGED_ONLY)
        if self.logged_only and not line.startswith("conformance: "):
            self.held += 1
            return False
        return True


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gate",
        allow_abbrev=False,
        description="The conformance gate for one mlx-vlm or mlx-lm source: an isolated environment, the suite, "
        "a decision.",
        epilog="Exit codes: 0 no new failure, 1 a new failure, 2 a usage error, 3 the set-up is broken (one line says "
        "why). Options after -- go to pytest, e.g. -- -k test_forward.",
    )
    parser.add_argument(
        "source",
        help="a source tree (path), a git URL (git+https://host/repo.git@ref) or a requirement (mlx-vlm==0.4.4)",
    )
    parser.add_argument(
        "--package",
        choices=sources.PACKAGES,
        default="mlx-vlm",
        help="the package SOURCE provides (default: %(default)s)",
    )
    base = parser.add_mutually_exclusive_group()
    base.add_argument(
        "--baseline", type=Path, metavar="RESULTS", help="the base branch's results file: fail only on new failures"
    )
    base.add_argument("--base", metavar="SOURCE", help="a source for the base branch, run first to make the baseline")
    parser.add_argument(
        "--profile", default="ci", help="Hypothesis profile: ci (derandomized), dev or thorough (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gate-results"), help="where the outputs go (default: %(default)s)"
    )
    parser.add_argument(
        "--env-dir", type=Path, default=Path(".gate"), help="where environments are built (default: %(default)s)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the Python to build environments with (default: this one)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="rebuild an environment even where a pinned source's could be reused"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    command_line = parser()
    args = command_line.parse_args(own)
    args.out, args.env_dir = args.out.resolve(), args.env_dir.resolve()
    args.baseline = args.baseline.resolve() if args.baseline else None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pytest.log").write_text("")
    except OSError as error:
        command_line.print_usage(sys.stderr)
        print(f"python -m gate: error: --out {args.out}: cannot write: {error.strerror or error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return gate(args, pytest_args)
    except SetupError as error:
        print(f"gate: set-up failed: {error}", flush=True)
        return SETUP_FAILED
    except KeyboardInterrupt:
        print("gate: interrupted", flush=True)
        return INTERRUPTED


def gate(args: argparse.Namespace, pytest_args: list[str]) -> int:
    source = sources.parse(args.source, args.package)
    baseline = args.baseline
    if baseline is not None and not baseline.is_file():
        raise SetupError(f"--baseline {baseline}: no such file")
    if args.base:
        base_source = sources.parse(args.base, args.package)
        shared = base_source.slug() != source.slug() or base_source == source  # two trees both named mlx-vlm: apart
        folder = base_source.slug() if shared else f"base-{base_source.slug()}"
        base_python = environment.prepare(base_source, args.env_dir / folder, args.python, args.fresh)
        print(f"gate: the base, {base_source.text}, to make the baseline", flush=True)
        if run_suite(base_python, args, args.out / "base", pytest_args, what="the base") == USAGE_ERROR:
            return USAGE_ERROR
        baseline = args.out / "base" / "conformance.json"
    python = environment.prepare(source, args.env_dir / source.slug(), args.python, args.fresh)
    version = environment.installed_version(python, args.package)
    if version is None:
        raise SetupError(f"{source.text} installed no distribution named {args.package}")
    print(f"gate: {args.package} {version} from {source.text}; the suite at {environment.SUITE}", flush=True)
    status = run_suite(python, args, args.out, pytest_args, what="the suite")
    if status == USAGE_ERROR:
        return USAGE_ERROR
    decide = [str(python), "-m", "gate.outcome", str(args.out / "conformance.json"), "--package", args.package]
    decide += ["--html", str(args.out / "report.html"), "--markdown", str(args.out / "summary.md")]
    decide += ["--baseline", str(baseline)] if baseline else []
    outcome = subprocess.run(decide).returncode
    if outcome not in (PASSED, NEW_FAILURE, SETUP_FAILED):
        raise SetupError(f"deciding the outcome failed (exit {outcome}; its error is above)")
    written = ("summary.md", "report.html", "conformance.json", "junit.xml", "pytest.log")
    outputs = ", ".join(str(args.out / name) for name in written)
    print(f"gate: wrote {outputs}", flush=True)
    print(f"gate: exit {outcome}", flush=True)
    return outcome


def run_suite(python: Path, args: argparse.Namespace, out: Path, pytest_args: list[str], what: str) -> int:
    """Run the suite on the package's subjects, printing its output as it comes; 0, 1 or USAGE_ERROR."""
    out.mkdir(parents=True, exist_ok=True)
    command = [str(python), "-m", "pytest", str(environment.SUITE / "conformance"), "-p", "no:cacheprovider"]
    command += ["--hypothesis-profile", args.profile, "--subject", args.package.replace("-", "_") + ".*"]
    command += ["--results", str(out / "conformance.json"), "--report", "none", "--junitxml", str(out / "junit.xml")]
    tail: deque[str] = deque(maxlen=5)
    with (
        open(out / "pytest.log", "w") as log,
        subprocess.Popen(
            [*command, *pytest_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process,
    ):
        console = Console()
        for line in process.stdout:
            if console.shows(line):
                print(line, end="", flush=True)
            log.write(line)
            if line.strip():
                tail.append(line.strip())
        status = process.wait()
    if console.held:
        print(f"gate: pytest's tracebacks and failure lines ({console.held} lines) are in {out / 'pytest.log'}")
    if status in (0, 1):
        return status
    last = tail[-1] if tail else "no output"
    reason = f"{what} did not finish: pytest exited {status} ({PYTEST_EXITS.get(status, 'unknown')}): {last}"
    if status == 4:
        print(f"gate: {reason}", flush=True)
        return USAGE_ERROR
    raise SetupError(reason)


if __name__ == "__main__":
    sys.exit(main())
