"""Fixtures that run the real conformance suite, in-process, on subjects written for the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

import conformance.conftest  # noqa: F401

# Imported before any in-process run, so pytester's module snapshot keeps them (and MLX) loaded.
import conformance.registry  # noqa: F401

pytest_plugins = ["pytester"]

CONFORMANCE = Path(__file__).resolve().parent.parent / "conformance"


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
        result = pytester.runpytest_inprocess(
            str(path), "-p", "no:cacheprovider", "--results", str(results), *profile_args, *args
        )
        document = json.loads(results.read_text()) if results.exists() else {}
        return SuiteRun(result.ret, result.stdout.str() + result.stderr.str(), document)

    yield run
    settings.load_profile(profile)
