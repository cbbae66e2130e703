"""The studies of the verdict (``studies/``): they draw what they say, reproducibly, and measure what they claim."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conformance import divergences, family_tests
from conformance.families import BASES, FAMILIES
from foundation.cases import make_linear_case
from foundation.dtypes import FLOAT16, FLOAT32
from foundation.quantization import AVAILABLE, KINDS
from foundation.rebuild import case_from_description
from foundation.schema import CheckRecord, Row, Status
from foundation import memo, systematic
from foundation.verdict import Tracked, compare
from reports.results import Results
from studies import (
    catch_rates,
    check_runs,
    detection,
    extremes,
    false_alarms,
    flakiness,
    publish,
    same_verdicts,
    sampling,
)
from tests import documents

SUITE = Path(__file__).resolve().parents[2] / "conformance"
LINEAR = dict(
    in_features=64,
    out_features=8,
    r=4,
    alpha=8.0,
    use_rslora=False,
    dropout=0.0,
    batch_shape=(3,),
    has_bias=True,
    magnitudes=(1.0, 1.0, 1.0, 1.0),
    seed=5,
)


def keys_of_chunk(family: str, dtype: str, kind: str, seed: int, chunk: int, size: int = 10) -> list[str]:
    keys: list[str] = []
    strategy = sampling.strategy(family, dtype, kind)
    sampling.draw_chunk(strategy, seed, chunk, size, lambda case: keys.append(sampling.key(case.describe())))
    return keys


@pytest.mark.parametrize("kind", sampling.KINDS)
def test_the_same_seed_draws_the_same_cases_and_another_seed_others(kind):
    first = keys_of_chunk("linear", "float16", kind, seed=3, chunk=1)
    assert first == keys_of_chunk("linear", "float16", kind, seed=3, chunk=1)
    other = keys_of_chunk("linear", "float16", kind, seed=4, chunk=1)
    # Hypothesis starts every run from the simplest draws, which seeds may share; the rest differ.
    assert len(set(first) & set(other)) <= 2


def test_a_study_takes_the_shortest_prefix_of_chunks_that_is_enough_whatever_finishes_first():
    results = sampling.until_enough(
        lambda index: index, lambda done: sum(done) >= 6, workers=1, progress=lambda _: None
    )
    assert results == [0, 1, 2, 3]  # 0 + 1 + 2 + 3 = 6


@pytest.mark.parametrize("cancel", ["input", "terms"])
def test_a_cancelling_case_cancels_and_replays_from_its_description(cancel):
    case = make_linear_case(FLOAT32, cancel=cancel, **LINEAR)
    base, lora = case.x @ case.weight.T, case.scale * (case.x @ case.lora_A.T) @ case.lora_B.T
    magnitude = np.abs(case.x) @ np.abs(case.weight).T
    cancelled = base if cancel == "input" else base + lora
    assert np.max(np.abs(cancelled)) < 1e-3 * np.max(magnitude)
    again = case_from_description(case.describe())
    assert (
        case.describe()["cancel"] == cancel
        and np.array_equal(again.x, case.x)
        and np.array_equal(again.weight, case.weight)
    )


def test_a_case_that_cannot_cancel_as_asked_is_refused():
    with pytest.raises(ValueError, match="'terms' needs a float base"):
        make_linear_case(FLOAT32, cancel="terms", quantization=AVAILABLE[0], **{**LINEAR, "in_features": 64})
    with pytest.raises(ValueError, match="should be None or one of"):
        make_linear_case(FLOAT32, cancel="sometimes", **LINEAR)


def test_extreme_cases_reach_what_the_suite_rarely_does():
    """Hypothesis also draws constants it finds in the modules loaded so far, so what a seed draws depends on which
    tests ran before in the process: 100 cases, so that the extremes show whatever was loaded (30 missed small
    alphas once, under xdist)."""
    drawn = []
    sampling.draw_chunk(extremes.cases_for("linear", FLOAT16), seed=0, index=0, size=100, visit=drawn.append)
    assert drawn and all(max(c.in_features, c.out_features) >= 1024 for c in drawn)
    assert max(c.r for c in drawn) > 64 and {c.cancel for c in drawn} == {None, "input", "terms"}
    assert min(c.alpha for c in drawn) < 0.1 and max(c.alpha for c in drawn) > 10


def test_smallest_caught_is_where_the_margin_reaches_one_in_both_directions():
    error, allowed, term = np.array([0.5, 0.0]), np.array([1.0, 1.0]), np.array([2.0, 0.0])
    # +e: 0.5 + 2e = 1 at e = 0.25; -e: 0.5 - 2e = -1 at e = 0.75: both caught beyond 0.75.
    assert detection.smallest_caught(error, allowed, term) == pytest.approx(0.75)
    assert detection.smallest_caught(error, allowed, np.zeros(2)) == float("inf")


def test_a_perturbation_just_beyond_the_measured_threshold_fails_the_real_comparison():
    case = make_linear_case(FLOAT16, **LINEAR)
    expected = Tracked.exact(case.x, FLOAT16) @ Tracked.exact(case.weight.T, FLOAT16)
    pattern = np.sign(np.sin(np.arange(expected.value.size))).reshape(expected.value.shape)
    observed = expected.value + 0.3 * expected.bound * pattern  # a correct layer's errors, within the bound
    term = expected.value
    e = detection.smallest_caught(observed - expected.value, 2 * expected.bound, term)
    for sign in (1, -1):
        assert not compare("y", "subject", observed + sign * 1.001 * e * term, expected).passed
    assert (
        compare("y", "subject", observed + 0.999 * e * term, expected).passed
        or compare("y", "subject", observed - 0.999 * e * term, expected).passed
    )


def test_the_false_alarm_study_runs_every_check_and_writes_its_figures(tmp_path):
    out = tmp_path / "linear.json"
    assert false_alarms.main(["--family", "linear", "--dtype", "float32", "--cases", "12", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["cases"] >= 12 and not document["false_alarms"]
    assert {"forward", "merge", "grad", "dropout_scaling", "steps_sgd"} <= set(document["checks"])
    assert 0 < document["largest_margin"] <= 1
    assert "python -m conformance.replay" in document["checks"]["forward"]["largest"]["subject"]["replay"]
    assert "forward" in document["check_runs"] and "merge" in document["check_runs"]


def test_a_study_s_cases_make_check_runs_of_the_ci_size_and_a_run_beyond_the_threshold_is_a_false_alarm():
    runs = check_runs.CheckRuns(size=3)
    quiet = systematic.Component("output", "LoRA term", 0.0, 0.01, 0.0, 0.0)
    loud = systematic.Component("output", "LoRA term", 1.0, 0.01, 0.0, 0.0)
    for index, component in enumerate([quiet] * 3 + [loud] * 3 + [quiet] * 2):  # the last two make no run
        runs.add({"seed": index, "adapter_dtype": "bfloat16"}, [component], skipped=set())
    summary = check_runs.merge([runs.finished()])["terms"]["output|LoRA term|bfloat16"]
    assert summary["runs"] == 2 and summary["false_alarms"] == 1
    assert summary["whole"]["cases"] == 8 and summary["detectable_median"] > 0
    assert summary["worst_case"] == {"statistic": 100.0, "case": {"seed": 3, "adapter_dtype": "bfloat16"}}  # to replay
    skipped = check_runs.CheckRuns(size=1)
    skipped.add({"seed": 0}, [loud], skipped={"output"})  # a formula the layer differs in by design
    assert not check_runs.merge([skipped.finished()])["terms"]


def test_a_run_beyond_the_threshold_that_a_known_divergence_of_its_cases_explains_is_counted_as_that():
    """A correct layer on a quantized base calls MLX's quantized product, whose known imprecision the suite's entries
    explain; a study counts such a run as the suite does."""
    explanation = divergences.parse_explanation("grad x: systematic ~ base term")
    entry = divergences.KnownDivergence("test_quantized_linear.py::test_grad[*-float16-mxfp8]", explanation, "MLX", 1)
    loud = systematic.Component("grad x", "base term", 1.0, 0.01, 0.0, 0.0)
    other = systematic.Component("grad x", "LoRA term", 1.0, 0.01, 0.0, 0.0)
    runs = check_runs.CheckRuns(size=2)
    for index in range(4):
        runs.add({"seed": index, "adapter_dtype": "float16"}, [loud, other], set(), [entry] if index < 2 else [])
    terms = check_runs.merge([runs.finished()])["terms"]
    base, lora = terms["grad x|base term|float16"], terms["grad x|LoRA term|float16"]
    assert (base["false_alarms"], base["known_divergences"]) == (1, 1)  # the second run's cases have no entry
    assert (lora["false_alarms"], lora["known_divergences"]) == (2, 0)  # the entry names the base term only


def test_a_study_publishes_the_largest_statistic_of_the_runs_no_known_divergence_explains(tmp_path):
    explanation = divergences.parse_explanation("grad x: systematic ~ base term")
    entry = divergences.KnownDivergence("test_quantized_linear.py::test_grad[*-float16-mxfp8]", explanation, "MLX", 1)
    runs = check_runs.CheckRuns(size=2)
    for index, coefficient in enumerate([1.0, 1.0, 0.01, 0.01]):
        component = systematic.Component("grad x", "base term", coefficient, 0.01, 0.0, 0.0)
        runs.add({"seed": index, "adapter_dtype": "float32"}, [component], set(), [entry] if index < 2 else [])
    merged = check_runs.merge([runs.finished()])
    term = merged["terms"]["grad x|base term|float32"]
    assert term["largest_statistic"] > systematic.THRESHOLD and term["known_divergences"] == 1
    assert term["largest_unexplained_statistic"] == pytest.approx(2**0.5)  # 0.01 +- 0.01 / sqrt(2)
    path = _result(tmp_path, publish.VERDICT_TIGHTENED)
    path.write_text(json.dumps({**json.loads(path.read_text()), "kind": "drawn", "check_runs": {"grad": merged}}))
    assert "(1.41 over the runs no known divergence explains; " in publish.summary(publish.studies(tmp_path))
    del term["largest_unexplained_statistic"]  # as a study measured before results kept it
    path.write_text(json.dumps({**json.loads(path.read_text()), "check_runs": {"grad": merged}}))
    row = next(line for line in publish.render(publish.studies(tmp_path)).splitlines() if "grad: grad x" in line)
    assert "| not kept |" in row


def test_a_seed_whose_cases_all_pass_is_caught_by_its_check_run():
    found = catch_rates.run_seed(catch_rates.Task("ScaleOffInBfloat16", "bfloat16", None, examples=150, seed=1))
    assert found == {"caught": True, "by": "the check run", "cases": found["cases"]}


def test_studies_on_other_bases_draw_those_bases():
    quantized, conv1d = [], []
    sampling.draw_chunk(sampling.strategy("linear", "float32", "drawn", "quantized"), 0, 0, 40, quantized.append)
    sampling.draw_chunk(sampling.strategy("dora_linear", "float16", "drawn", "conv1d"), 0, 0, 10, conv1d.append)
    assert {case.quantization.kind for case in quantized} == set(KINDS)
    assert all(case.fan_in_fan_out and case.use_dora for case in conv1d)


def test_a_further_seed_or_another_subject_adds_a_study_instead_of_overwriting_one():
    assert sampling.result_name("linear", "float", "bfloat16", "drawn", seed=2) == "linear-bfloat16-drawn-seed2.json"
    release = sampling.result_name("linear", "float", "bfloat16", "drawn", seed=2, subject="mlx_lm.LoRALinear")
    assert release == "mlx_lm.LoRALinear-linear-bfloat16-drawn-seed2.json"
    catalogue = sampling.result_name("linear", "quantized", "float16", "drawn", subject="catalogue:RawAlpha")
    assert catalogue == "catalogue_RawAlpha-linear-quantized-float16-drawn.json"


def test_a_study_of_float32_adapters_draws_only_those_and_says_so_in_its_file_name(tmp_path):
    drawn, extreme = [], []
    sampling.draw_chunk(sampling.strategy("linear", "bfloat16", "drawn", "float", "float32"), 0, 0, 20, drawn.append)
    sampling.draw_chunk(
        sampling.strategy("dora_linear", "float16", "extreme", "float", "float32"), 0, 0, 3, extreme.append
    )
    assert drawn and extreme and all(case.mixed and case.adapter_dtype.name == "float32" for case in drawn + extreme)
    name = sampling.result_name("linear", "float", "bfloat16", "drawn", "float32")
    assert name == "linear-bfloat16-float32-adapters-drawn.json"
    out = tmp_path / name
    options = ["--family", "linear", "--dtype", "bfloat16", "--cases", "6", "--adapter-dtype", "float32"]
    assert false_alarms.main([*options, "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["adapter_dtype"] == "float32" and "--adapter-dtype float32" in document["command"]


@pytest.mark.parametrize("base", BASES)
def test_a_study_names_each_check_as_the_suite_does_so_that_known_divergences_apply(base):
    """The study counts a subject's failure in a known divergence of the suite as that: the ids must be the suite's."""
    case = {"dtype": "float16", "quantization": {"mode": "mxfp8", "bits": 8, "group_size": 32}}
    for family in FAMILIES.values():
        for check in family.checks_on(base):
            module, _, test = false_alarms.check_id(family.name, base, check, "S", case).partition("::")
            assert test.split("[")[0] in family_tests.module_tests(module), (family.name, base, check)
    on_cpu = divergences.load(divergences.DEFAULT_PATH, "cpu")
    mxfp8 = false_alarms.check_id("linear", "quantized", "forward", "catalogue:CorrectLoRALinear", case)
    assert mxfp8 == "test_quantized_linear.py::test_forward[catalogue:CorrectLoRALinear-float16-mxfp8]"
    assert divergences.covering(on_cpu, mxfp8)


def test_a_correct_output_failing_in_a_known_divergence_is_left_out_of_detection_as_that_and_any_other_as_failing():
    task = sampling.Study(
        detection.run_chunk, "catalogue:CorrectLoRALinear", "linear", "float16", "drawn", 0, 1, "quantized"
    )
    known = false_alarms.known_divergences()
    mxfp8, affine = (
        {"dtype": "float16", "quantization": {"mode": mode, "bits": bits, "group_size": size}}
        for mode, bits, size in (("mxfp8", 8, 32), ("affine", 4, 64))
    )
    assert detection.failure_kind(known, task, mxfp8) == "known_divergences"
    assert detection.failure_kind(known, task, affine) == "failing"


def test_a_study_forgets_what_each_case_kept_once_its_checks_are_done():
    task = sampling.Study(false_alarms.run_chunk, "catalogue:CorrectLoRALinear", "linear", "float32", "drawn", 0, 4)
    visited = []

    def visit(case, index: int) -> None:
        memo.once(case, "oracle", lambda: np.zeros(3))
        visited.append(case)

    task.each_distinct(0, visit)
    assert visited and not any(memo.kept(case) for case in visited)


def test_a_study_of_named_checks_runs_only_those_and_each_on_every_case(tmp_path):
    out = tmp_path / "steps.json"
    options = ["--family", "linear", "--dtype", "float32", "--cases", "12", "--check", "steps_sgd", "--out", str(out)]
    assert false_alarms.main(options) == 0
    document = json.loads(out.read_text())
    assert set(document["checks"]) == {"steps_sgd"} and "--check steps_sgd" in document["command"]
    tally = document["checks"]["steps_sgd"]
    assert tally["runs"] + tally["not_judgeable"] >= document["cases"]  # not every 10th, as among all checks


@pytest.mark.parametrize(
    ("family", "options", "refusal"),
    [
        ("embedding", ["--base", "conv1d"], "no embedding layer on a conv1d base"),
        ("linear", ["--base", "quantized", "--kind", "extreme"], "extreme cases have float bases only"),
        ("linear", ["--adapter-dtype", "float32"], "no float32 adapters on a float32 base of linear"),
        ("switch_linear", ["--adapter-dtype", "float32"], "no float32 adapters on a float32 base of switch_linear"),
        ("linear", ["--check", "steps"], "linear has no check steps on a float base (its checks: forward,"),
    ],
)
def test_a_study_the_suite_has_no_cases_of_is_refused(family, options, refusal, capsys):
    with pytest.raises(SystemExit):
        false_alarms.main(["--family", family, "--dtype", "float32", *options])
    assert refusal in capsys.readouterr().err


def test_a_study_says_at_once_when_it_cannot_write(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        false_alarms.main(["--family", "linear", "--dtype", "float32", "--out", str(tmp_path / "file" / "x.json")])
    assert "cannot write" in capsys.readouterr().err


def test_a_seed_catches_a_wrong_variant_and_the_modes_where_a_bug_is_invisible_are_not_counted():
    assert catch_rates.run_seed(catch_rates.Task("RawAlpha", "float32", None, examples=5, seed=0))["caught"]
    assert {kind for _, kind in catch_rates.configurations("QuantizedWidthRoundedDown")} == {"affine-unaligned"}
    assert not catch_rates.measurable("LookupWithoutRangeCheck")


def test_a_seed_draws_as_many_cases_as_the_ci_profile_gives_the_variants_check():
    from foundation import profiles

    before = profiles.active()
    assert catch_rates.ci_examples("RawAlpha", None) == 150  # test_linear.py's test_forward: the whole profile
    assert catch_rates.ci_examples("ExpertBiasNotRouted", None) == 75  # fewer_examples(2)
    assert catch_rates.ci_examples("LookupInDefaultDtype", "mxfp4") == 15  # fewer_examples(10), per mode
    assert profiles.active() == before


def _one_case_run() -> tuple[Row, CheckRecord, Results]:
    """A run of one passing check of one case (margin 0.25)."""
    row = documents.row("t::f[x]", "f", {"seed": 1}, verdict="pass", margin=0.25)
    check = CheckRecord(check_id="t::f[x]", subject="s", dtype="float32", check="f", status=Status.PASS)
    return row, check, Results(runs=[{}], rows=[row], checks=[check])


def test_two_runs_differ_when_a_verdict_does_and_a_moved_margin_is_counted_apart():
    row, check, run = _one_case_run()
    assert flakiness.differences(flakiness.fingerprint(run), flakiness.fingerprint(run)) == []
    assert flakiness.margin_drift(flakiness.margins(run), flakiness.margins(run))["cases"] == 0
    moved = dataclasses.replace(run, rows=[dataclasses.replace(row, margin=0.2500001)])
    assert flakiness.differences(flakiness.fingerprint(run), flakiness.fingerprint(moved)) == []
    drift = flakiness.margin_drift(flakiness.margins(run), flakiness.margins(moved))
    assert drift["cases"] == 1 and drift["highest_margin"] == 0.2500001 and drift["largest"]["first"] == 0.25
    failed = dataclasses.replace(run, rows=[dataclasses.replace(row, verdict=Status.FAIL, margin=1.5)])
    assert flakiness.differences(flakiness.fingerprint(run), flakiness.fingerprint(failed))


def test_two_results_files_compare_by_each_checks_status_and_each_cases_verdict():
    row, check, run = _one_case_run()
    moved = dataclasses.replace(run, rows=[dataclasses.replace(row, margin=0.5)])
    assert same_verdicts.differences(run, moved) == [] and same_verdicts.moved_margins(run, moved) == 1
    failed = Results(
        runs=[{}],
        rows=[dataclasses.replace(row, verdict=Status.FAIL)],
        checks=[dataclasses.replace(check, status=Status.FAIL)],
    )
    assert same_verdicts.differences(run, failed) == [
        "check t::f[x]: pass before, fail after",
        'case only before (1×): t::f[x] pass {"seed": 1}',
        'case only after (1×): t::f[x] fail {"seed": 1}',
    ]


def test_the_published_document_is_rendered_from_the_results_in_the_repository():
    found = publish.studies()
    assert publish.DOCUMENT.read_text() == publish.render(found), "run python -m studies.publish"
    assert json.loads(publish.FIGURES.read_text()) == publish.figures(found), "run python -m studies.publish"
    page = publish.SUMMARY_PAGE.read_text()
    assert page == publish.with_summary(page, publish.summary(found)), "run python -m studies.publish"


def _result(folder: Path, measured: str | None) -> Path:
    source = publish.RESULTS / "false_alarms" / "linear-float32-extreme.json"
    document = json.loads(source.read_text())
    document.pop("measured")
    if measured:
        document["measured"] = measured
    (folder / "false_alarms").mkdir(exist_ok=True)
    (folder / "detection").mkdir(exist_ok=True)
    path = folder / "false_alarms" / source.name
    path.write_text(json.dumps(document))
    return path


def test_a_result_measured_before_the_verdict_was_tightened_is_published_as_the_earlier_verdicts(tmp_path):
    _result(tmp_path, "2026-11-29")
    found = publish.studies(tmp_path)
    assert found["false_alarms"][0]["earlier_verdict"]
    assert "(earlier verdict)" in publish.render(found)
    assert "extreme*" in publish.summary(found) and "\\* measured before" in publish.summary(found)
    _result(tmp_path, publish.VERDICT_TIGHTENED)
    found = publish.studies(tmp_path)
    assert "(earlier verdict)" not in publish.render(found) and "*" not in publish.summary(found)


def test_the_detection_table_counts_the_cases_left_out_failing_and_as_known_divergences(tmp_path):
    _result(tmp_path, publish.VERDICT_TIGHTENED)
    source = publish.RESULTS / "detection" / "linear-float16-drawn.json"
    document = {**json.loads(source.read_text()), "failing": [], "known_divergences": [{"dtype": "float16"}] * 3}
    (tmp_path / "detection" / source.name).write_text(json.dumps(document))
    page = publish.render(publish.studies(tmp_path))
    row = next(line for line in page.splitlines() if line.startswith("| linear | float | float16 |"))
    assert f"| {document['cases']:,} | 0 (3) |" in row


def test_a_result_that_does_not_say_when_it_was_measured_is_refused(tmp_path):
    path = _result(tmp_path, None)
    with pytest.raises(publish.ResultError, match=str(path)):
        publish.studies(tmp_path)


def test_the_flakiness_table_shows_the_margins_that_moved_and_the_highest_of_them(tmp_path):
    _result(tmp_path, publish.VERDICT_TIGHTENED)
    run = {
        "exit": 0,
        "seconds": 1.0,
        "cases_judged": 2,
        "statuses": {"pass": 1},
        "differences": [],
        "margin_drift": {"cases": 0, "largest": None, "highest_margin": None},
    }
    moved = {**run, "margin_drift": flakiness.margin_drift({("t::g", "{}"): 0.004}, {("t::g", "{}"): 0.0046})}
    document = {
        "study": "flakiness",
        "measured": publish.VERDICT_TIGHTENED,
        "command": "python -m studies.flakiness",
        "subjects": [],
        "identical": True,
        "runs": [run, moved],
    }
    (tmp_path / "flakiness.json").write_text(json.dumps(document))
    page = publish.render(publish.studies(tmp_path))
    assert "| 1 | 0 | 2 | pass 1 | 1.0 | none |" in page
    assert "| 2 | 0 | 2 | pass 1 | 1.0 | 1 (0.0046; most: `t::g`, 0.004 then 0.0046) |" in page


def test_the_flakiness_study_refuses_fewer_than_two_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        flakiness.main(["--runs", "1", "--out", str(tmp_path / "f.json")])
    assert "at least 2" in capsys.readouterr().err and not (tmp_path / "f.json").exists()


def test_a_known_divergence_of_peft_leaves_out_peft_s_margins_and_keeps_the_subject_s():
    """The switch layers' reference (peft's target_parameters) has entries of its own in half precision: the study
    reports the correct layer's largest margins there, and not peft's."""
    task = sampling.Study(
        false_alarms.run_chunk, "catalogue:CorrectLoRASwitchLinear", "switch_linear", "bfloat16", "drawn", 0, 2
    )
    found = task(0)
    assert found["keys"] and not found["false_alarms"]
    for check in ("forward", "grad"):
        sides = found["checks"][check]["largest"]
        assert "subject" in sides and "reference" not in sides, (check, sides)
    assert set(found["checks"]["merge"]["largest"]) == {"subject", "reference"}


def _with_check_runs(folder: Path) -> dict:
    """The extreme Linear result with two drawn check runs of forward, one of them 2 scales off."""
    path = _result(folder, publish.VERDICT_TIGHTENED)
    runs = check_runs.CheckRuns(size=2)
    for index, coefficient in enumerate([0.0, 0.02, 0.0, 0.0]):
        runs.add(
            {"seed": index, "adapter_dtype": "float32"},
            [systematic.Component("output", "LoRA term", coefficient, 0.01, 0.0, 0.0)],
            set(),
        )
    document = {
        **json.loads(path.read_text()),
        "kind": "drawn",
        "check_runs": {"forward": check_runs.merge([runs.finished()])},
    }
    path.write_text(json.dumps(document))
    return document


def test_a_study_s_check_runs_are_published_with_their_largest_statistic_and_what_a_run_catches(tmp_path):
    document = _with_check_runs(tmp_path)
    page = publish.render(publish.studies(tmp_path))
    alarms = next(
        line
        for line in page.splitlines()
        if line.startswith(f"| `{document['subject']}` | linear |") and "forward: output / LoRA term" in line
    )
    assert "| 2 | 0 | 0 | 1.41 (5.8) |" in alarms  # two runs, none beyond; the first pools to 0.01 +- 0.01 / sqrt(2)
    caught = next(
        line for line in page.splitlines() if line.startswith("| linear | float | float32 | float32 | forward |")
    )
    assert "| LoRA term | 2 | 1 | 2 |" in caught


def test_studies_of_one_stratum_under_several_seeds_make_one_row_of_what_a_run_catches(tmp_path):
    document = _with_check_runs(tmp_path)
    term = document["check_runs"]["forward"]["terms"]["output|LoRA term|float32"]
    other = copy.deepcopy(document) | {"seed": 1}
    other["check_runs"]["forward"]["terms"]["output|LoRA term|float32"] |= {
        "runs": 3,
        "detectable_q99": term["detectable_q99"] * 4,
        "detectable_median": term["detectable_median"] * 2,
    }
    (tmp_path / "false_alarms" / "linear-float32-drawn-seed1.json").write_text(json.dumps(other))
    rows = [
        line
        for line in publish.render(publish.studies(tmp_path)).splitlines()
        if line.startswith("| linear | float | float32 | float32 | forward | output | LoRA term |")
    ]
    assert len(rows) == 1, rows
    cells = [cell.strip() for cell in rows[0].split("|")[8:13]]
    median = f"{term['detectable_median']:.2g}–{term['detectable_median'] * 2:.2g}"
    assert cells == ["2", "2", "5", f"{term['detectable_q99'] * 4:.2g}", median], cells


def test_what_a_run_catches_of_forward_s_lora_term_is_held_against_its_dtype_s_target(tmp_path):
    document = _with_check_runs(tmp_path)
    term = document["check_runs"]["forward"]["terms"]["output|LoRA term|float32"]
    for q99, verdict in [(publish.RUN_TARGETS["float32"] * 3, "no (3x)"), (publish.RUN_TARGETS["float32"], "yes")]:
        term["detectable_q99"] = q99
        (tmp_path / "false_alarms" / "linear-float32-extreme.json").write_text(json.dumps(document))
        page = publish.render(publish.studies(tmp_path))
        row = next(line for line in page.splitlines() if line.startswith("| linear | float | float32 | float32 | 2 |"))
        assert row.endswith(f"| {verdict} |"), row
        assert f"({int(verdict == 'yes')} of 1 met)" in page


@pytest.mark.parametrize(
    ("name", "change", "listed"),
    [
        ("mlx_lm.LoRALinear-linear-float32-drawn.json", {"subject": "mlx_lm.LoRALinear"}, "| `mlx_lm.LoRALinear` |"),
        (
            "linear-bfloat16-float32-adapters-drawn.json",
            {"dtype": "bfloat16", "adapter_dtype": "float32"},
            "| `catalogue:CorrectLoRALinear` | linear | float | drawn | bfloat16 (float32 adapters) |",
        ),
    ],
    ids=["a release", "float32 adapters only"],
)
def test_a_study_unlike_a_ci_run_adds_its_false_alarms_but_no_row_of_what_a_run_catches(tmp_path, name, change, listed):
    document = {**_with_check_runs(tmp_path), **change}
    (tmp_path / "false_alarms" / name).write_text(json.dumps(document))
    lines = publish.render(publish.studies(tmp_path)).splitlines()
    assert any(line.startswith(listed) for line in lines)
    assert sum(line.startswith("| linear | float | float32 | float32 | forward |") for line in lines) == 1
    assert not any(line.startswith("| linear | float | bfloat16 |") and "| forward |" in line for line in lines)


def test_a_release_s_study_is_listed_after_the_correct_layer_s_of_its_family_and_dtype(tmp_path):
    document = _with_check_runs(tmp_path)
    release = document | {"subject": "mlx_lm.LoRALinear"}
    (tmp_path / "false_alarms" / "0-named-first.json").write_text(json.dumps(release))
    lines = publish.render(publish.studies(tmp_path)).splitlines()
    first = [line.split("|")[1].strip() for line in lines if line.startswith("| `") and "| linear | float |" in line]
    assert first[:2] == [f"`{document['subject']}`", "`mlx_lm.LoRALinear`"], first
