"""The pytest plugin: options, clear errors, the header and summary, not-provided subjects, xdist recording."""

import json

import mlx.core as mx
import pytest

from conformance import replay
from subjects.known import CATALOGUE, select

CORRECT = ("--subject", "catalogue:CorrectLoRALinear")
USAGE_ERROR = pytest.ExitCode.USAGE_ERROR


def test_header_names_versions_device_profile_and_seed(run_suite):
    run = run_suite(*CORRECT, "--dtype", "float32", profile_args=("--hypothesis-seed", "7"), module="test_linear.py")
    assert run.ret == 0, run.output
    assert "conformance: mlx " in run.output and "peft " in run.output and "torch " in run.output
    assert f"MLX device {run.results['meta']['device']}" in run.output
    assert "Hypothesis profile dev, seed 7 (replay with --hypothesis-seed=7)" in run.output
    assert run.results["meta"]["seed"].startswith("7 ")


def test_the_same_seed_draws_the_same_cases_and_gives_the_same_verdicts(run_suite):
    def judged(seed: str) -> list:
        run = run_suite(
            *CORRECT,
            "--dtype",
            "float16",
            "-k",
            "test_forward",
            profile_args=("--hypothesis-seed", seed),
            module="test_linear.py",
        )
        assert run.ret == 0, run.output
        return sorted(
            (r["check_id"], json.dumps(r["case"], sort_keys=True), r["verdict"], r["margin"])
            for r in run.results["rows"]
        )

    first = judged("12")
    assert first == judged("12")
    assert first != judged("13")


LINEAR_ROWS_PER_DTYPE = 3 * 150 + 4 * (150 // 3)
"""test_linear.py in float16 or bfloat16: forward, merge and grad with the ci profile's 150 examples, grad_bias_all,
dropout and the two optimizer steps (of float32 adapters) a third each (dropout_scaling runs in float32 only)."""


def test_summary_line_counts_the_cases_checked(run_suite):
    run = run_suite(*CORRECT, "--dtype", "float16", module="test_linear.py")
    rows = run.results["rows"]
    assert len(rows) == LINEAR_ROWS_PER_DTYPE
    assert f"conformance: {len(rows)} cases checked (0 outside the allowed error)" in run.output
    assert {r["subject"] for r in rows} == {"catalogue:CorrectLoRALinear"}
    assert all(r["versions"]["mlx"] == mx.__version__ and r["device"] for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--subject", "mlx_lm.NoSuchLayer"),
            "unknown subject 'mlx_lm.NoSuchLayer'; valid subjects: mlx_vlm.LoRaLayer,",
        ),
        (("--subject", "no.such.module:X"), "cannot import no.such.module"),
        (
            ("--subject", "mlx_vln.*"),
            "subject pattern 'mlx_vln.*' matches no subject; valid subjects: mlx_vlm.LoRaLayer,",
        ),
        (("--mlx-device", "tpu"), "invalid choice: 'tpu' (choose from cpu, gpu)"),
        (("--dtype", "float8"), "invalid choice: 'float8'"),
        (
            ("--hypothesis-profile", "nightly"),
            "unknown Hypothesis profile 'nightly'; valid profiles: ci, dev, thorough",
        ),
    ],
)
def test_bad_options_are_one_line_errors(run_suite, args, message):
    run = run_suite(*args)
    assert run.ret == USAGE_ERROR
    assert message in run.output.replace("'cpu', 'gpu'", "cpu, gpu")


def test_a_subject_pattern_selects_one_packages_subjects_in_catalogue_order_once_each():
    chosen = select(["mlx_vlm.*", "mlx_vlm.LoRaLayer", "mlx_lm.DoRA*"])
    assert [s.name for s in chosen] == [s.name for s in CATALOGUE if s.name.startswith("mlx_vlm.")] + [
        "mlx_lm.DoRALinear",
        "mlx_lm.DoRAEmbedding",
    ]


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal")
def test_gpu_without_metal_is_refused(run_suite):
    run = run_suite("--mlx-device", "gpu")
    assert run.ret == USAGE_ERROR and "no Metal device; valid here: cpu" in run.output


@pytest.mark.parametrize(("option", "name"), [("--results", "results.json"), ("--report", "report.html")])
def test_unwritable_results_or_report_path_is_refused_before_running(run_suite, tmp_path, option, name):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = run_suite(*CORRECT, option, str(blocker / name))
    assert run.ret == USAGE_ERROR
    assert f"{option} {blocker / name}: cannot write: {blocker} is a file, not a directory" in run.output


def test_subjects_not_provided_are_skipped_with_the_installed_version(run_suite):
    run = run_suite(
        "--subject", "catalogue:AbsentClass", "--subject", "catalogue:AbsentPackage", module="test_linear.py"
    )
    assert run.ret == 0, run.output
    assert {c["status"] for c in run.results["checks"]} == {"not provided"}
    assert f"mlx {mx.__version__} does not provide it (looked in mlx.nn:NoSuchLoRALayer)" in run.output
    assert "no-such-distribution is not installed" in run.output


def test_a_new_failure_is_shrunk_and_a_known_divergence_judges_every_case(run_suite, tmp_path):
    known = tmp_path / "known.txt"
    known.write_text(
        "test_linear.py::test_forward[catalogue:RawAlpha-float32] | output: "
        "beyond hint ~ the LoRA term is [0-9.]+× peft's"
        "  # alpha is not divided by r\n"
    )
    run = run_suite(
        "--subject",
        "catalogue:RawAlpha",
        "--dtype",
        "float32",
        "-k",
        "test_forward or test_merge",
        "--known-divergences",
        str(known),
        module="test_linear.py",
    )
    assert run.ret == pytest.ExitCode.TESTS_FAILED
    assert run.status("forward", "float32") == {"known divergence"} and run.status("merge", "float32") == {"fail"}
    failing = {
        check: [r for r in run.results["rows"] if r["check"] == check and r["verdict"] == "fail"]
        for check in ("forward", "merge")
    }
    # The known divergence: every drawn case judged, each failure explained by the entry, nothing shrunk.
    assert len([r for r in run.results["rows"] if r["check"] == "forward"]) == 150
    assert failing["forward"] and all(
        r["explained_by"] == [r["explained_by"][0]] and r["explained_by"][0] for r in failing["forward"]
    )
    # The new failure: the shrinker tried many smaller failing cases and reports the smallest.
    assert len(failing["merge"]) > 2
    final = next(r for r in failing["merge"] if r["final"])
    assert final["case"]["in_features"] == final["case"]["out_features"] == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("test_linear.py::test_forward[catalogue:RawAlpha-float32] | output: beyond margin 1..9", "has no reason"),
        ("test_linear.py::test_forward[catalogue:RawAlpha-float32]  # why", "does not say which failure it explains"),
        ("test_linear.py::test_forward[x] | output: beyond  # why", "needs the margin range"),
    ],
)
def test_a_known_divergence_needs_what_it_explains_and_a_reason(run_suite, tmp_path, line, message):
    known = tmp_path / "known.txt"
    known.write_text(line + "\n")
    run = run_suite(*CORRECT, "--known-divergences", str(known))
    assert run.ret == USAGE_ERROR and message in run.output


def test_recording_survives_xdist_workers(run_suite):
    serial = run_suite(*CORRECT, "--dtype", "bfloat16", module="test_linear.py")
    parallel = run_suite(*CORRECT, "--dtype", "bfloat16", "-n", "2", module="test_linear.py")
    assert parallel.ret == 0, parallel.output
    assert len(parallel.results["rows"]) == len(serial.results["rows"]) == LINEAR_ROWS_PER_DTYPE
    assert sorted(c["check_id"] for c in parallel.results["checks"]) == sorted(
        c["check_id"] for c in serial.results["checks"]
    )


def test_a_failure_replays_without_pytest(run_suite, capsys):
    run = run_suite("--subject", "catalogue:SwappedScalingRules", "--dtype", "float32", module="test_linear.py")
    replay_line = next(line for line in run.output.splitlines() if "python -m conformance.replay '" in line)
    spec = replay_line.split("'", 1)[1].rsplit("'", 1)[0]
    assert json.loads(spec)["subject"] == "catalogue:SwappedScalingRules"
    assert replay.main([spec]) == 1
    assert "scaling rules are swapped" in capsys.readouterr().out
