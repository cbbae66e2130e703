"""The subjects of one check and dtype share its cases: drawn alike, built once, judged against one oracle and one
reference, and run together (in one xdist worker)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest

from conformance import conftest as plugin
from conformance import scheduling
from conformance.scheduling import CheckGroupScheduling, check_group, group_order
from foundation import cases
from reference import peft_layers

TWO_SUBJECTS = ("--subject", "catalogue:CorrectLoRALinear", "--subject", "mlx_lm.LoRALinear")


def _cases_by_subject(run) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for row in run.results["rows"]:
        found[row["subject"]].append(json.dumps(row["case"], sort_keys=True))
    return found


def test_a_group_is_a_test_without_its_subject():
    assert check_group("conformance/test_linear.py::test_forward[mlx_lm.LoRALinear-float32]") == (
        "conformance/test_linear.py::test_forward[float32]"
    )
    assert check_group("test_quantized_linear.py::test_grad[catalogue:RawAlpha-bfloat16-affine-unaligned]") == (
        "test_quantized_linear.py::test_grad[bfloat16-affine-unaligned]"
    )
    assert check_group("conformance/test_linear.py::test_forward") == "conformance/test_linear.py::test_forward"
    ids = ["m.py::t[a-float32]", "m.py::t[a-float16]", "m.py::t[b-float32]", "m.py::t[b-float16]"]
    assert group_order(ids) == {"m.py::t[float32]": 0, "m.py::t[float16]": 1}


def test_each_case_is_built_once_and_peft_judged_once_for_all_subjects(run_suite, monkeypatch):
    built = {"case": 0, "peft": 0}
    make, linear = cases.make_linear_case, peft_layers.linear

    def counting(what, function):
        def count(*arguments, **keywords):
            built[what] += 1
            return function(*arguments, **keywords)

        return count

    monkeypatch.setattr(cases, "make_linear_case", counting("case", make))
    monkeypatch.setattr(peft_layers, "linear", counting("peft", linear))
    run = run_suite(*TWO_SUBJECTS, "--dtype", "float32", "-k", "test_forward", module="test_linear.py")
    assert run.ret == 0, run.output
    drawn = _cases_by_subject(run)
    assert drawn["catalogue:CorrectLoRALinear"] == drawn["mlx_lm.LoRALinear"] and len(drawn) == 2
    distinct = len(set(drawn["mlx_lm.LoRALinear"]))
    assert built["peft"] == distinct  # every case judged by peft once, whatever the number of subjects
    assert distinct <= built["case"] < 2 * distinct  # the rejected draws are built once too


def test_the_subjects_of_a_quantized_check_draw_the_same_cases(run_suite):
    # Hypothesis' pytest plugin would give each parametrization of a test with a parametrize mark (the
    # quantization kind's) a seed of its own; the plugin gives it the group's.
    run = run_suite(
        *TWO_SUBJECTS, "--dtype", "bfloat16", "-k", "test_forward and mxfp4", module="test_quantized_linear.py"
    )
    assert run.ret == 0, run.output
    drawn = _cases_by_subject(run)
    assert len(drawn) == 2 and drawn["catalogue:CorrectLoRALinear"] == drawn["mlx_lm.LoRALinear"]
    assert len(set(drawn["mlx_lm.LoRALinear"])) > 1


def test_under_xdist_a_group_runs_in_one_worker_and_its_subjects_one_after_the_other(run_suite):
    run = run_suite(*TWO_SUBJECTS, "--dtype", "float32", "-n", "2", "-v", module="test_linear.py")
    assert run.ret == 0, run.output
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", run.output)
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, nodeid in ran:
        workers[check_group(nodeid)].add(worker)
    assert len(workers) == 8 and all(len(found) == 1 for found in workers.values()), workers
    assert {worker for worker, _ in ran} == {"gw0", "gw1"}


@pytest.mark.parametrize(("dist", "ours"), [("load", True), ("loadfile", False), ("loadgroup", False), ("each", False)])
def test_xdist_s_load_distribution_sends_groups_and_other_distributions_are_xdist_s_own(monkeypatch, dist, ours):
    monkeypatch.setattr(scheduling, "CheckGroupScheduling", lambda config, log: ("groups", config, log))
    config = SimpleNamespace(getvalue=lambda name: {"dist": dist}[name])
    chosen = plugin.pytest_xdist_make_scheduler(config, "log")
    assert chosen == (("groups", config, "log") if ours else None)


@pytest.mark.parametrize(
    "nodeid",
    [
        "conformance/test_linear.py::test_forward[mlx_vlm.LoRaLayer-float16]",
        "conformance/test_quantized_switch_linear.py::test_merge[mlx_lm.LoRASwitchLinear-float32-mxfp8]",
    ],
)
def test_the_scheduler_s_unit_of_work_is_the_group(nodeid):
    scheduler = CheckGroupScheduling.__new__(CheckGroupScheduling)
    assert scheduler._split_scope(nodeid) == check_group(nodeid)
