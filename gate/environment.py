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
import subprocess
import sys
from pathlib import Path

from gate import SetupError
from gate.sources import Source

SUITE = Path(__file__).resolve().parent.parent
TORCH = ["torch==2.13.0"] if sys.platform == "linux" else []
STAMP = ".gate-environment.json"


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
    print(f"gate: building {directory} for {source.text}", flush=True)
    _run([python, "-m", "venv", "--clear", str(directory)], f"cannot create a virtual environment with {python}")
    pip = [str(python_of(directory)), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    _run([*pip, source.pip_argument()], f"cannot install the source {source.text}")
    _run([*pip, *TORCH, "-e", str(SUITE)], "cannot install the conformance suite beside it")
    stamp.write_text(json.dumps(plan))
    return python_of(directory)


def installed_version(python: Path, distribution: str) -> str | None:
    probe = f"import importlib.metadata as m\ntry: print(m.version({distribution!r}))\nexcept m.PackageNotFoundError: pass"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip()
    return found or None


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise SetupError(f"{what}: {error.strerror or error}") from None
    if done.returncode != 0:
        raise SetupError(f"{what}: {_first_error(done.stderr or done.stdout)}")


def _first_error(output: str) -> str:
    """pip's own one-line reason: its last ``ERROR:`` line, else the last line it wrote."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]
