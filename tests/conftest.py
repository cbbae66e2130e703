"""Fixtures that run the real conformance suite, in-process, on subjects written for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

import conformance.conftest

# Imported before any in-process run, so pytester's module snapshot keeps them (and MLX) loaded.
import conformance.families  # noqa: F401
from conformance import threads

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "conformance"
GATE_ENVIRONMENTS = ROOT / ".tox" / "gate"
"""Where the gate builds the environments of pinned releases for the tests (reused between them)."""


_CONFIG: list[pytest.Config] = []
"""This process's pytest configuration, for `to_terminal`."""


def pytest_configure(config: pytest.Config) -> None:
    """The project's own tests hold the suite's thread policy too, in each of their xdist workers, and know its
    marks (some build the generated test modules' functions outside a conformance run)."""
    threads.apply(threads.chosen())
    conformance.conftest.register_markers(config)
    _CONFIG[:] = [config]


@contextlib.contextmanager
def to_terminal() -> Iterator[None]:
    """What is printed inside goes to the terminal while a test runs, also from an xdist worker (whose standard
    output nobody reads, but whose standard error is the terminal's): a long step's progress."""
    capture = _CONFIG[0].pluginmanager.getplugin("capturemanager") if _CONFIG else None
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        sys.stderr.flush()


LINEAR_ONLY = ("--", "-k", "test_linear.py", "--dtype", "float32")
"""pytest options after which a gate runs the linear checks in float32 only: minutes instead of tens."""


def run_gate(tmp_path: Path, source: str, *args: str, env_dir: Path = GATE_ENVIRONMENTS) -> subprocess.CompletedProcess:
    """``python -m gate SOURCE`` writing into tmp_path/out; `args` may end in ``-- pytest options``."""
    own = ["--out", str(tmp_path / "out"), "--env-dir", str(env_dir)]
    building(source, args[args.index("--package") + 1] if "--package" in args else "mlx-vlm", env_dir)
    return subprocess.run([sys.executable, "-m", "gate", source, *own, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="session")
def gate_on_0_4_4(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """The gate on mlx-vlm 0.4.4, the release that scales by the raw alpha (its linear checks in float32): the
    run and its output folder. Its tests share the ``gate`` xdist group, so one worker runs it, once."""
    tmp_path = tmp_path_factory.mktemp("gate-0.4.4")
    return run_gate(tmp_path, "mlx-vlm==0.4.4", *LINEAR_ONLY), tmp_path / "out"


def building(requirement: str, package: str = "mlx-vlm", env_dir: Path = GATE_ENVIRONMENTS) -> bool:
    """Whether the gate will build an environment for `requirement` (minutes) rather than reuse one; said on the
    terminal when it will."""
    from gate import environment, sources

    source = sources.parse(requirement, package)
    if not (source.pinned and (env_dir / source.slug() / environment.STAMP).exists()):
        with to_terminal():
            print(f"\ntests: the gate builds an environment for {requirement} under {env_dir} (a few minutes)")
        return True
    return False


@dataclass
class SuiteRun:
    """The outcome of one ``pytest conformance`` run: exit code, output and the results file."""

    ret: int
    output: str
    results: dict

    def status(self, check: str, dtype: str) -> set[str]:
        return {c["status"] for c in self.results["checks"] if c["check"] == check and c["dtype"] == dtype}


@pytest.fixture
def run_suite(pytester: pytest.Pytester, tmp_path: Path):
    """Run ``pytest conformance`` with the given arguments (ci profile unless overridden)."""
    profile = settings.get_current_profile_name()

    def run(
        *args: str, profile_args: tuple[str, ...] = ("--hypothesis-profile", "ci"), module: str | None = None
    ) -> SuiteRun:
        """Run the suite, or only its test module `module`."""
        results = tmp_path / "results.json"
        path = CONFORMANCE / module if module else CONFORMANCE
        result = pytester.runpytest_inprocess(  # no report: `recorded_run` tests it; here it would cost seconds a run
            str(path), "-p", "no:cacheprovider", "--results", str(results), "--report", "none", *profile_args, *args
        )
        document = json.loads(results.read_text()) if results.exists() else {}
        return SuiteRun(result.ret, result.stdout.str() + result.stderr.str(), document)

    yield run
    settings.load_profile(profile)


@dataclass
class RecordedRun:
    """A real ``pytest conformance`` run, in a subprocess, with its results file and reports."""

    ret: int
    output: str
    folder: Path

    @property
    def results(self) -> Path:
        return self.folder / "conformance.json"

    @property
    def report(self) -> Path:
        return self.folder / "report.html"


RECORDED_SUBJECTS = (
    "CorrectLoRALinear",
    "CorrectDoRALinear",
    "CorrectLoRAEmbedding",
    "RawAlpha",
    "TransposedMerge",
    "MergeDropsBias",
    "DoRANormOverColumns",
    "DoRAMergeForgetsMagnitude",
    "EmbeddingLookupUnscaled",
    "EmbeddingMergeTransposed",
    "GradientLeaksIntoBase",
    "DoRANormNotDetached",
)
"""Correct layers and wrong variants whose failures a standalone script can reproduce (forward, merge, gradients)."""
RECORDED_KNOWN = (
    "test_linear.py::test_forward[catalogue:RawAlpha-bfloat16] | output: beyond hint ~ the LoRA term is [0-9.]+× peft's"
    "  # a known divergence, for the report's tests\n"
)


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    """forward, merge and gradients of Linear, DoRA and Embedding on `RECORDED_SUBJECTS`, float32 and bfloat16,
    dev profile.

    Its tests share one xdist group (``--dist loadgroup``), so one worker records it, once."""
    folder = tmp_path_factory.mktemp("recorded")
    known = folder / "known.txt"
    known.write_text(RECORDED_KNOWN)
    subjects = [arg for name in RECORDED_SUBJECTS for arg in ("--subject", f"catalogue:{name}")]
    modules = [str(CONFORMANCE / m) for m in ("test_linear.py", "test_dora_linear.py", "test_embedding.py")]
    command = [
        sys.executable,
        "-m",
        "pytest",
        *modules,
        "-p",
        "no:cacheprovider",
        "-k",
        "test_forward or test_merge or test_grad",
        "--hypothesis-profile",
        "dev",
        "--hypothesis-seed",
        "3",
        "--dtype",
        "float32",
        "--dtype",
        "bfloat16",
        "--known-divergences",
        str(known),
        "--results",
        str(folder / "conformance.json"),
        "--report",
        str(folder / "report.html"),
        *subjects,
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=environment)
    return RecordedRun(run.returncode, run.stdout + run.stderr, folder)
