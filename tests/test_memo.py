"""Work done once per case: the checks that meet one case share the oracle's formulas and each side's layer."""

from __future__ import annotations

import dataclasses
import gc
import weakref

from catalogue import CorrectLoRALinear
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
    assert checks.forward(CorrectLoRALinear, case).passed  # after the merge: both layers built again
    assert built == {"peft": 2, "mlx": 2}


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
