"""A new family is one record in `conformance.families`, a two-line test module and its subjects: the plugin
parametrizes, draws, records and reports its checks like any other family's (docs/development.md, "Adding a family")."""

from __future__ import annotations

import json

import pytest
from hypothesis import settings

from conformance import families, family_tests
from tests.example_family import CORRECT, LINEAR_WITHOUT_BIAS, MODULE, TEST_MODULE, WRONG


@pytest.fixture
def run_family(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Run the family's module in-process; the Hypothesis profile the run loads is undone after it."""
    monkeypatch.setitem(families.FAMILIES, LINEAR_WITHOUT_BIAS.name, LINEAR_WITHOUT_BIAS)
    profile = settings.get_current_profile_name()
    pytester.makepyfile(**{MODULE.removesuffix(".py"): TEST_MODULE})

    def run(subject: str) -> tuple[int, dict]:
        results = tmp_path / f"{subject.rpartition(':')[2]}.json"
        outcome = pytester.runpytest_inprocess(
            "-p",
            "conformance.conftest",
            "-p",
            "no:cacheprovider",
            "--hypothesis-profile",
            "ci",
            "--dtype",
            "float32",
            "--subject",
            subject,
            "--results",
            str(results),
            "--report",
            "none",
        )
        return outcome.ret, json.loads(results.read_text())

    yield run
    settings.load_profile(profile)


def test_a_family_described_once_runs_its_checks_on_its_subjects(run_family):
    ret, results = run_family(CORRECT.name)
    assert ret == 0
    statuses = {c["check_id"]: c["status"] for c in results["checks"]}
    assert statuses == {
        f"{MODULE}::test_forward[{CORRECT.name}-float32]": "pass",
        f"{MODULE}::test_merge[{CORRECT.name}-float32]": "pass",
    }
    counts = {check: sum(r["check"] == check for r in results["rows"]) for check in ("forward", "merge")}
    assert counts == {"forward": 150, "merge": 50}  # the profile's examples, and a third for merge
    assert not any(r["case"]["bias"] for r in results["rows"])  # the family's own cases


def test_a_wrong_layer_of_the_new_family_fails_its_check(run_family):
    ret, results = run_family(WRONG.name)
    assert ret == pytest.ExitCode.TESTS_FAILED
    assert {c["check"]: c["status"] for c in results["checks"]} == {"forward": "fail", "merge": "fail"}


def test_each_family_s_checks_are_the_tests_of_its_modules():
    for family in families.FAMILIES.values():
        for base in family.bases:
            generated = family_tests.module_tests(base.module)
            assert {base.test_name(c.name) for c in base.checks} <= set(generated), (family.name, base.base)
            for check in base.checks:
                test = generated[base.test_name(check.name)]
                assert test.__doc__ == check.doc and check.doc, (family.name, base.base, check.name)
