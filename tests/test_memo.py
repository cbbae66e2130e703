"""Work done once per case: the checks that meet one case share the oracle's formulas and each side's layer."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest

from catalogue import CorrectLoRALinear, RawAlpha
from conformance import checks
from foundation import memo
from foundation.cases import make_linear_case
from foundation.dtypes import FLOAT32
from reference import oracle, peft_layers


def _case():
    return make_linear_case(FLOAT32, 8, 6, 2, 4.0, False, 0.0, (3,), True, (1.0, 1.0, 1.0, 1.0), seed=5)


def test_a_formula_is_computed_once_per_case_and_a_case_made_again_computes_it_anew():
    case = _case()
    assert oracle.merged_weight(case) is oracle.merged_weight(case)
    again = dataclasses.replace(case)
    assert oracle.merged_weight(again) is not oracle.merged_weight(case)
    assert (oracle.merged_weight(again).bound == oracle.merged_weight(case).bound).all()


def test_checks_of_one_case_share_each_sides_layer_and_a_merge_leaves_the_next_caller_a_new_one(monkeypatch):
    built = {"peft": 0, "mlx": 0}
    build_peft, build_mlx = peft_layers.linear, CorrectLoRALinear.convention.build

    def counting(side, build):
        def count(*arguments):
            built[side] += 1
            return build(*arguments)

        return count

    monkeypatch.setattr(peft_layers, "linear", counting("peft", build_peft))
    monkeypatch.setattr(CorrectLoRALinear.convention, "build", counting("mlx", build_mlx))
    case = _case()
    assert checks.forward(CorrectLoRALinear, case).passed and checks.merge(CorrectLoRALinear, case).passed
    assert built == {"peft": 1, "mlx": 1}
    # After the merge the subject's layer is built again; peft's forward was judged once for this case already.
    assert checks.forward(CorrectLoRALinear, case).passed
    assert built == {"peft": 1, "mlx": 2}


def test_the_reference_side_of_a_check_is_judged_once_per_case_whatever_the_subject(monkeypatch):
    calls = []
    forward = peft_layers.forward
    monkeypatch.setattr(peft_layers, "forward", lambda *arguments: calls.append(1) or forward(*arguments))
    case = _case()
    first, second = checks.forward(CorrectLoRALinear, case), checks.forward(RawAlpha, case)
    assert len(calls) == 1
    reference = [c for c in first.comparisons if c.side == "reference"]
    assert reference and reference == [c for c in second.comparisons if c.side == "reference"]
    assert first.passed and not second.passed


def test_a_layer_run_merges_once_and_builds_again_after_a_merge():
    events = []

    def build(case):
        events.append("build")
        return object()

    def merge(layer):
        events.append("merge")
        return layer

    case = _case()
    run = memo.LayerRun(case, build, merge)
    first = run.layer()
    assert run.layer() is first and run.merged() is run.merged() and run.layer() is not first
    assert events == ["build", "merge", "build"]


def test_a_case_goes_with_what_it_kept_as_soon_as_nothing_refers_to_it():
    gc.disable()  # no cycle collector: only reference counts may free it
    try:
        case = _case()
        checks.forward(CorrectLoRALinear, case)
        checks.merge(CorrectLoRALinear, case)
        assert memo.kept(case)
        gone = weakref.ref(case)
        del case
        assert gone() is None
    finally:
        gc.enable()


def test_a_case_made_again_with_replace_keeps_nothing():
    case = _case()
    oracle.linear_forward(case)
    assert memo.kept(case) and not memo.kept(dataclasses.replace(case))


def test_within_a_scope_a_case_is_built_once_per_parameters_and_a_new_scope_builds_it_again():
    builds = []

    def build():
        builds.append(1)
        return object()

    try:
        memo.share_cases("test_forward[float32]")
        first = memo.built_once(("linear", 1), build)
        assert memo.built_once(("linear", 1), build) is first and memo.built_once(("linear", 2), build) is not first
        memo.share_cases("test_forward[float16]")
        assert memo.built_once(("linear", 1), build) is not first
        assert len(builds) == 3
    finally:
        memo.share_cases(None)
    assert memo.built_once(("linear", 1), build) is not memo.built_once(("linear", 1), build)  # no scope: every time


def test_what_a_case_kept_goes_when_its_scope_ends_even_if_the_case_lives_on():
    try:
        memo.share_cases("test_forward[float32]")
        case = memo.built_once(("linear", 1), _case)
        memo.once(case, "oracle", lambda: np.zeros(3))
        assert memo.kept(case)
        memo.share_cases("test_forward[float16]")
        assert not memo.kept(case)  # a reference cycle may keep the case; its graphs go now
        memo.built_once(("linear", 1), lambda: None)  # what cannot be drawn is None, and forgetting it is nothing
    finally:
        memo.share_cases(None)


def test_a_shared_case_cannot_be_changed_by_a_check():
    case = _case()
    with pytest.raises(ValueError, match="read-only"):
        case.x[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        dataclasses.replace(case, weight=np.ones((6, 8))).weight[0, 0] = 2.0
