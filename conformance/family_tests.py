"""The test modules' tests, generated from the families' descriptions (`conformance.families`).

A family's test module holds ``globals().update(family_tests.module_tests("test_<family>.py"))``: one test per
check, named ``test_<check>``, drawing the check's cases and asserting its measurement, with the markers the
plugin reads (family, check, dtypes) and, on a quantized base, one parametrization per quantization kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.asserting import record_and_assert
from conformance.families import FAMILIES, BaseInfo, CheckInfo, Family
from foundation import memo, profiles
from foundation.quantization import KINDS


def _test(family: Family, base: BaseInfo, info: CheckInfo) -> Callable:
    """The test function of one check: draw a case as the check draws them, run the check, record and assert."""

    @functools.cache  # built once: Hypothesis works out a new strategy's properties at its first draw
    def drawn(*arguments: object) -> st.SearchStrategy:
        cases = base.cases(*arguments)
        for keep in info.keep:  # a case met again (`memo.share_cases`) is not judged again
            cases = cases.filter(lambda case, keep=keep: memo.once(case, keep, lambda: keep(case)))
        return cases

    if base.base == "quantized":

        def test(subject, dtype, kind, data, recorder):
            record_and_assert(recorder, info.run(subject, data.draw(drawn(dtype, kind), label="case")))
    else:

        def test(subject, dtype, data, recorder):
            record_and_assert(recorder, info.run(subject, data.draw(drawn(dtype), label="case")))

    name = base.test_name(info.name)
    test.__name__ = test.__qualname__ = name
    test.__module__ = f"conformance.{base.module.removesuffix('.py')}"
    test.__doc__ = info.doc
    # Every generated test has this function's source, from which Hypothesis derives a test's example-database
    # key; this is how Hypothesis itself tells its generated tests apart (hypothesis.stateful).
    test._hypothesis_internal_add_digest = f"{base.module}::{name}".encode()
    wrapped = given(data=st.data())(test)
    if info.examples > 1:
        wrapped = profiles.fewer_examples(info.examples)(wrapped)
    marks = [pytest.mark.family(family.name), pytest.mark.check(info.name)]
    if info.dtypes is not None:
        marks.append(pytest.mark.dtypes(*info.dtypes))
    if base.base == "quantized":
        marks.append(pytest.mark.parametrize("kind", KINDS))
    for mark in marks:
        wrapped = mark(wrapped)
    return wrapped


def module_tests(module: str) -> dict[str, Callable]:
    """The tests of every family's checks on the bases whose module is `module` (a file name): what that test
    module holds, by name (``globals().update(family_tests.module_tests("test_linear.py"))``)."""
    tests = {}
    for family in FAMILIES.values():
        for base in family.bases:
            if base.module == module:
                for info in base.checks:
                    test = _test(family, base, info)
                    tests[test.__name__] = test
    if not tests:
        raise LookupError(f"no family's checks are generated into {module}")
    return tests
