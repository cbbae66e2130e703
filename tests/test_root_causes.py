"""Failures are read by root cause: one subject's checks that fail with one diagnosis are one finding, shown once
on its plainest case, in the gate's console, the summary and the report."""

from __future__ import annotations

from gate.__main__ import Console
from gate.outcome import console_lines
from reports import html, markdown
from reports.regression import compare
from reports.results import merge
from reports.root_causes import cause_of, diagnosis, root_causes
from tests.documents import check, document, row

RAW_ALPHA = "(= r: the raw alpha is used where alpha / r belongs; or 1/scale: the scale is not applied)"
FLOAT32_CASE = {"dtype": "float32", "r": 2}


def _failing(subject: str, name: str, dtype: str, hint: str, final: bool = True, **fields) -> tuple[dict, object]:
    """A failing check of `subject` and the case that shows it, diagnosed with `hint`."""
    check_id = f"test_linear.py::test_{name}[{subject}-{dtype}]"
    failing = row(
        check_id,
        name,
        {**FLOAT32_CASE, "dtype": dtype},
        subject=subject,
        dtype=dtype,
        hints=[hint] if hint else [],
        final=final,
        **fields,
    )
    return check(check_id, subject, dtype, name, "fail") | {"replay": f"python -m conformance.replay {name}"}, failing


def _results(*failures: tuple[dict, object]):
    return merge([document([c for c, _ in failures], rows=[r for _, r in failures])])


RAW_ALPHA_RUN = [
    _failing("mlx_vlm.LoRaLayer", "forward", "bfloat16", f"the LoRA term is 2.004× peft's {RAW_ALPHA}"),
    _failing("mlx_vlm.LoRaLayer", "grad", "float16", f"grad A, grad B agree with a LoRA scale 4× peft's {RAW_ALPHA}"),
    _failing("mlx_vlm.LoRaLayer", "forward", "float32", f"the LoRA term is 2.000× peft's {RAW_ALPHA}"),
    _failing("mlx_vlm.LoRaLayer", "forward", "float16", f"the LoRA term is 2.000× peft's {RAW_ALPHA}", final=False),
    _failing("mlx_lm.LoRALinear", "forward", "float32", f"the LoRA term is 2.000× peft's {RAW_ALPHA}"),
]


def test_one_subjects_checks_with_one_reading_are_one_root_cause_whatever_the_check_dtype_or_factor():
    results = _results(*RAW_ALPHA_RUN)
    causes = root_causes(results.checks, results.failing_case_by_check())
    assert [(c.subject, len(c.checks)) for c in causes] == [("mlx_vlm.LoRaLayer", 4), ("mlx_lm.LoRALinear", 1)]
    assert causes[0].cause == "the LoRA scale is off by a factor r: the raw alpha is used where alpha / r belongs"
    assert causes[0].check_names() == ["linear:forward (bfloat16, float32, float16)", "linear:grad (float16)"]


def test_a_cause_is_shown_on_its_plainest_case_shrunk_and_in_float32():
    results = _results(*RAW_ALPHA_RUN)
    shown = root_causes(results.checks, results.failing_case_by_check())[0]
    assert shown.representative.check_id == "test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]"
    assert shown.diagnosis == f"the LoRA term is 2.000× peft's {RAW_ALPHA}"


def test_an_exception_is_one_cause_whatever_the_check_that_raised_it_and_where_the_package_lives():
    message = "subject {}: raised ImportError: cannot import name 'load_adapters' from 'mlx_vlm.trainer' ({})"
    first = cause_of(message.format("logits", "/a/site-packages/mlx_vlm/trainer/__init__.py"))
    assert first == cause_of(message.format("adapted modules", "/b/mlx_vlm/trainer/__init__.py"))
    assert first == "raises ImportError: cannot import name 'load_adapters' from 'mlx_vlm.trainer'"


def test_without_a_reading_the_numbers_of_one_case_do_not_split_a_cause():
    assert cause_of("subject grad A[7, 49]=1.07, but should be 0.0234 (error 1.05, allowed 8.4e-07)") == cause_of(
        "subject grad A[0, 1]=-3, but should be 2 (error 5, allowed 1e-3)"
    )
    assert cause_of("subject grad A[0]=1, but should be 2") != cause_of("subject grad B[0]=1, but should be 2")


def test_the_quoted_comparison_is_the_one_the_observed_and_allowed_figures_come_from():
    grad_x = "subject grad x[143]=-44.08, but should be -0.959 (error 43.1, allowed 0.00015, margin 2.88e+05)"
    grad_a = "subject grad A[7, 49]=1.07, but should be 0.0234 (error 1.05, allowed 8.44e-07, margin 1.25e+06)"
    failing = row("t", "grad", FLOAT32_CASE, failures=[grad_x, grad_a], worst=grad_a, max_error=1.05)
    assert diagnosis(check("t", "s", "float32", "grad", "fail"), failing) == grad_a


def test_the_gates_console_names_each_cause_once_with_its_checks_its_case_and_its_replay():
    results = _results(*RAW_ALPHA_RUN)
    lines = console_lines(results, compare(results))
    assert lines[0] == "gate: 5 new failure(s), 2 root cause(s)"
    assert lines[1] == (
        "gate: root cause 1 of 2: mlx_vlm.LoRaLayer: the LoRA scale is off by a factor r: the raw alpha is used "
        "where alpha / r belongs"
    )
    assert lines[2] == "  fails 4 check(s): linear:forward (bfloat16, float32, float16); linear:grad (float16)"
    assert lines[3].startswith("  shown on test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]: the LoRA term")
    assert lines[4] == "  replay: python -m conformance.replay forward"
    assert len(lines) == 9


def test_the_gates_console_leaves_pytests_tracebacks_and_failure_lines_to_its_log():
    output = [
        "conformance/test_linear.py FF.. [100%]\n",
        "=================================== FAILURES ===================================\n",
        "____ test_forward[mlx_vlm.LoRaLayer-float32] ____\n",
        "E   AssertionError: mlx_vlm.LoRaLayer forward: disagrees\n",
        "conformance: 12 cases checked (2 outside the allowed error); checks: 2 fail, 2 pass\n",
        "=========================== short test summary info ============================\n",
        "FAILED conformance/test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]\n",
        "========================= 2 failed, 2 passed in 3.00s ==========================\n",
    ]
    console = Console()
    shown = [line for line in output if console.shows(line)]
    assert shown == [output[0], output[4], output[7]] and console.held == 5


def test_the_summary_gives_each_cause_a_section_and_folds_every_failing_check_away():
    results = _results(*RAW_ALPHA_RUN)
    summary = markdown.render(results)
    assert "### New failures: 5 check(s), 2 root cause(s)" in summary
    cause = summary.index("#### 1. mlx_vlm.LoRaLayer: the LoRA scale is off by a factor r: the raw alpha")
    assert summary.index("python -m conformance.replay forward", cause) < summary.index("#### 2. mlx_lm.LoRALinear")
    assert "<details><summary>every failing check (5)</summary>" in summary


def test_the_report_opens_on_the_root_causes_before_the_matrix():
    page = html.render(_results(*RAW_ALPHA_RUN))
    causes = page.index('<section id="root-causes">')
    assert causes < page.index('<section id="matrix">')
    assert "Failures by root cause: 2 causes of 5 failing checks" in page
    first = page[causes : page.index('id="cause-2"')]
    assert (
        "mlx_vlm.LoRaLayer: the LoRA scale is off by a factor r" in first
        and "python -m conformance.replay forward" in first
    )


def test_a_runs_terminal_summary_names_each_root_cause_once(run_suite):
    selection = ("--subject", "catalogue:RawAlpha", "--dtype", "float32", "-k", "test_forward or test_grad")
    run = run_suite(*selection, module="test_linear.py")
    summary = run.output[run.output.index("failures by root cause: ") :]
    assert summary.startswith("failures by root cause: 1 of 3 failing checks")
    assert "1. catalogue:RawAlpha: the LoRA scale is off by a factor " in summary
    assert "   fails linear:forward (float32); linear:grad (float32); linear:grad_bias_all (float32)" in summary
    assert "   replay: " in summary and " -m conformance.replay " in summary
