"""The thread policy: one thread per library by default, in the plugin's process and in every xdist worker."""

from __future__ import annotations

import os

import pytest
import torch

from conformance import threads

CORRECT = ("--subject", "catalogue:CorrectLoRALinear", "--dtype", "float32", "-k", "test_forward")


@pytest.fixture(autouse=True)
def default_policy_afterwards():
    """Each test may change the policy and its variables; the tests after it run under the default again."""
    names = (threads.ENVIRONMENT, *threads.CHILD_VARIABLES)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop(threads.ENVIRONMENT, None)
    yield
    threads.apply(threads.Policy(threads.DEFAULT, "default"))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _libraries(measured: dict) -> dict:
    return {name: count for name, count in measured.items() if isinstance(count, int)}


def test_a_run_holds_one_thread_per_library_in_the_controller_and_in_every_xdist_worker(run_suite):
    run = run_suite(*CORRECT, "-n", "2", module="test_linear.py")
    assert run.ret == 0, run.output
    recorded = run.results["meta"]["threads"]
    assert (recorded["policy"], recorded["source"]) == (1, "default")
    assert set(recorded["in_force"]) == {"controller", "gw0", "gw1"}
    for process, measured in recorded["in_force"].items():
        libraries = _libraries(measured)
        assert {"torch intra-op", "torch inter-op"} <= set(libraries), process
        assert any(name.startswith(("openblas", "openmp")) for name in libraries), (process, measured)
        assert set(libraries.values()) == {1}, (process, measured)
    assert "conformance: threads per process 1 (default): torch intra-op 1, torch inter-op 1" in run.output
    assert "were not 1 as asked" not in run.output


def test_the_option_beats_the_environment_variable_and_native_sets_nothing(run_suite, monkeypatch):
    monkeypatch.setenv(threads.ENVIRONMENT, "native")
    run = run_suite(*CORRECT, "--threads", "2", module="test_linear.py")
    assert run.ret == 0, run.output
    recorded = run.results["meta"]["threads"]
    assert (recorded["policy"], recorded["source"]) == (2, "--threads")
    # torch fixes its inter-op pool at its first parallel work: this process began with one thread there.
    controller = _libraries(recorded["in_force"]["controller"])
    del controller["torch inter-op"]
    assert set(controller.values()) == {2}, controller
    assert "threads per process 2 (--threads)" in run.output
    assert "conformance: threads in controller were not 2 as asked: torch inter-op 1" in run.output

    monkeypatch.setenv(threads.ENVIRONMENT, "native")  # the run above left its own policy there, for its children
    native = run_suite(*CORRECT, module="test_linear.py")
    assert native.results["meta"]["threads"]["policy"] == "native"
    assert f"threads per process native ({threads.ENVIRONMENT})" in native.output


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_a_one_line_usage_error(run_suite, value):
    run = run_suite(*CORRECT, "--threads", value, module="test_linear.py")
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    expected = f"--threads / ${threads.ENVIRONMENT}: threads {value!r}: should be a whole number of at least 1"
    assert expected in run.output


def test_applying_a_policy_sets_torch_and_blas_and_leaves_it_for_child_processes():
    measured = threads.apply(threads.chosen("2"))
    assert measured["torch intra-op"] == torch.get_num_threads() == 2
    assert {count for name, count in _libraries(measured).items() if not name.startswith("torch")} == {2}
    assert all(os.environ[variable] == "2" for variable in (*threads.CHILD_VARIABLES, threads.ENVIRONMENT))
    assert threads.chosen() == threads.Policy(2, threads.ENVIRONMENT)  # what a child process reads


def test_the_policy_comes_from_the_option_else_the_environment_else_one_thread(monkeypatch):
    assert threads.chosen() == threads.Policy(1, "default")
    monkeypatch.setenv(threads.ENVIRONMENT, "3")
    assert threads.chosen() == threads.Policy(3, threads.ENVIRONMENT)
    assert threads.chosen("native") == threads.Policy(None, "--threads")
