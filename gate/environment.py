"""An isolated virtual environment with this suite and one source of the package under test.

The source is installed first, so a source that cannot be installed fails fast and is named as the
cause; the suite (editable, from this checkout) after it. On Linux torch is pinned to a CPU build
(an unpinned torch there is a CUDA build of several GB); elsewhere pip chooses.

An environment is reused only for a pinned source (``mlx-vlm==0.4.4``, a git URL at a commit)
that it was built for; any other source gets a fresh one, as a pull request's CI would.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gate import SetupError
from gate.sources import Source

SUITE = Path(__file__).resolve().parent.parent
TORCH = ["torch==2.13.0"] if sys.platform == "linux" else []
STAMP = ".gate-environment.json"
WARM_UP = """
import conformance.conftest, conformance.checks, conformance.training_checks, reports.publish
from subjects.known import CATALOGUE
for subject in CATALOGUE:
    try:
        subject.not_provided_reason()  # imports the package's LoRA modules
    except Exception:  # a package that cannot be imported is the suite's run to report, not this one's
        pass
"""
"""What a run imports (the suite's modules, the test modules' own imports, the packages' LoRA modules): importing
it once writes the bytecode `pip install --no-compile` left out."""


def python_of(directory: Path) -> Path:
    return directory / "bin" / "python"  # MLX runs on macOS and Linux only


def prepare(source: Source, directory: Path, python: str = sys.executable, fresh: bool = False) -> Path:
    """The environment's python, built in `directory` (or reused, see the module's docstring).

    Two gates sharing `directory` take turns: the second waits, then reuses or rebuilds it.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(source, directory, python, fresh)


def _prepare(source: Source, directory: Path, python: str, fresh: bool) -> Path:
    plan = {"source": source.pip_argument(), "suite": str(SUITE), "python": python, "torch": TORCH}
    stamp = directory / STAMP
    if source.pinned and not fresh and stamp.exists() and json.loads(stamp.read_text()) == plan:
        print(f"gate: reusing {directory} (built for {source.text}; --fresh rebuilds it)", flush=True)
        return python_of(directory)
    print(f"gate: building {directory} for {source.text} (a few minutes; each step is named as it ends)", flush=True)
    _run([python, "-m", "venv", "--clear", str(directory)], f"cannot create a virtual environment with {python}")
    # pip compiles every module it installs (torch's thousands among them), which takes longer than the
    # installation itself; the suite's first import compiles only those it uses, and keeps them.
    pip = [str(python_of(directory)), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-compile"]
    _run([*pip, source.pip_argument()], f"cannot install the source {source.text}", step=f"installed {source.text}")
    _run(
        [*pip, *TORCH, "-e", str(SUITE)],
        "cannot install the conformance suite beside it",
        step="installed the suite" + (f" and {TORCH[0]}" if TORCH else ""),
    )
    what = "cannot import the conformance suite there"
    _run(
        [str(python_of(directory)), "-c", WARM_UP],
        what,
        {"PYTHONDONTWRITEBYTECODE": None},
        step="imported once (compiles what a run uses)",
    )
    stamp.write_text(json.dumps(plan))
    return python_of(directory)


def installed_version(python: Path, distribution: str) -> str | None:
    probe = (
        f"import importlib.metadata as m\ntry: print(m.version({distribution!r}))\nexcept m.PackageNotFoundError: pass"
    )
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip()
    return found or None


def _run(command: list[str], what: str, environment: dict[str, str | None] | None = None, step: str = "") -> None:
    """Run `command` (with `environment`'s variables set, or unset where None); `SetupError` naming `what`. A `step`
    is printed with its duration when it ends."""
    start = time.perf_counter()
    env = dict(os.environ)
    for name, value in (environment or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as error:
        raise SetupError(f"{what}: {error.strerror or error}") from None
    if done.returncode != 0:
        raise SetupError(f"{what}: {_first_error(done.stderr or done.stdout)}")
    if step:
        print(f"gate:   {step} ({time.perf_counter() - start:.0f} s)", flush=True)


def _first_error(output: str) -> str:
    """pip's own one-line reason: its last ``ERROR:`` line, else the last line it wrote."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]
