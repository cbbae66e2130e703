"""The benchmark's same-case mode: the suite's forward and merge checks against a bare loop on the same cases."""

from __future__ import annotations

import time

import pytest

from conformance import benchmark
from subjects.known import BY_NAME


def test_the_same_cases_mode_runs_both_on_the_same_cases_and_prints_their_speed_ratio(capsys):
    assert benchmark.main(["--same-cases", "--cases", "12", "--block", "4"]) == 0
    printed = capsys.readouterr().out
    assert "12 float32 cases of mlx_lm.LoRALinear, forward and merge, in blocks of 4, interleaved" in printed
    assert printed.count("12 of 12 cases within the allowed error") == 2
    assert "ratio: the suite runs at " in printed and "threads per process 1" in printed


def test_one_time_costs_fall_on_neither_side_of_the_same_case_ratio(monkeypatch):
    seen: list[int] = []

    def first_call_is_slow(*arguments) -> bool:  # as the first calls into torch, peft and MLX are
        seen.append(1)
        time.sleep(0.2 if len(seen) <= 2 else 0.0)
        return True

    monkeypatch.setattr(benchmark, "suite_checks", first_call_is_slow)
    monkeypatch.setattr(benchmark.bare_loop, "run", first_call_is_slow)
    found = benchmark.same_cases(BY_NAME["mlx_lm.LoRALinear"], "float32", 4, 2)
    assert len(seen) == 2 * (4 + 2) and found["agreed"] == {"suite": 4, "bare": 4}
    assert sum(found["blocks"]["suite"]) < 0.1 and sum(found["blocks"]["bare"]) < 0.1


def test_speed_ratios_are_the_bare_loops_time_over_the_suites_overall_and_by_median_block():
    overall, median = benchmark.speed_ratio({"suite": [2.0, 2.0, 10.0], "bare": [1.0, 1.5, 1.0]})
    assert overall == pytest.approx(3.5 / 14) and median == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--subject", "mlx_vlm.LoRaLayer"], "the bare loop builds a LoRALinear with from_base and fuse()"),
        (["--subject", "mlx_lm.DoRALinear"], "the bare loop builds a LoRALinear"),
        (["--dtype", "float32", "--dtype", "float16"], "--same-cases takes one --subject and one --dtype"),
        (["--block", "0"], "--block 0: at least 1"),
        (["--threads", "none"], "threads 'none': should be a whole number of at least 1, or 'native'"),
    ],
)
def test_a_same_cases_run_it_cannot_do_is_a_one_line_usage_error(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--same-cases", *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
