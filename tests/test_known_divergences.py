"""Known divergences in a run: an entry explains only the failure it names, every case is still judged,
a second bug behind an entry fails the check by name, and an entry that explains nothing fails the run."""

import sys
from dataclasses import dataclass

import pytest

from conformance import conftest as plugin
from conformance.divergences import KnownDivergence, parse_explanation
from foundation.schema import CheckRecord, Status

FAILED = pytest.ExitCode.TESTS_FAILED


def _known(tmp_path, check: str, subjects: str, dtype: str, *explanations: str) -> str:
    path = tmp_path / "known.txt"
    ids = f"test_linear.py::test_{check}[catalogue:{subjects}-{dtype}]"
    path.write_text("".join(f"{ids} | {explanation}  # the known one\n" for explanation in explanations))
    return str(path)


@dataclass(frozen=True)
class Behind:
    """A layer with one known divergence, the same with a second bug, and what the second one shows."""

    known: str
    second: str
    check: str
    dtype: str
    explains: str
    shows: str


BEHIND = {
    "dtype": Behind(
        "MergeUpcast", "MergeUpcastAndScalesTwice", "merge", "float16", "merged *: dtype float32", "subject merged "
    ),
    "raise": Behind(
        "MergeRefusesBiasFree",
        "MergeRefusesBiasFreeAndScalesTwice",
        "merge",
        "float32",
        "merge: raises NotImplementedError ~ bias-free",
        "subject merged ",
    ),
    "numerical": Behind(
        "RawAlpha",
        "RawAlphaDropsBias",
        "forward",
        "float32",
        "output: beyond hint ~ the LoRA term is [0-9.]+× peft's",
        "subject output[",
    ),
}


@pytest.mark.parametrize("kind", BEHIND)
def test_a_second_bug_behind_an_entry_fails_its_check_and_is_named(run_suite, tmp_path, kind):
    case = BEHIND[kind]
    entries = _known(tmp_path, case.check, f"{case.known}*", case.dtype, case.explains)
    selection = ("--dtype", case.dtype, "-k", f"test_{case.check} and not bias_all", "--known-divergences", entries)
    alone = run_suite("--subject", f"catalogue:{case.known}", *selection, module="test_linear.py")
    assert alone.ret == 0, alone.output
    assert alone.status(case.check, case.dtype) == {"known divergence"}
    rows = [r for r in alone.results["rows"] if r["check"] == case.check]
    assert len(rows) == 150, "every case is judged, not only the first failing one"
    explained = sum(alone.results["checks"][0]["explained"].values())
    assert explained == sum(len(r["failures"]) for r in rows) > 0
    assert f"1 known divergence ({explained} failing comparisons, each explained by an entry)" in alone.output
    assert "1 known divergence in " in alone.output.splitlines()[-1], "pytest names the status as the results do"
    replay = alone.results["checks"][0]["replay"]
    assert replay.startswith(f'{sys.executable} -m conformance.replay \'{{"subject": "catalogue:{case.known}"')

    behind = run_suite("--subject", f"catalogue:{case.second}", *selection, module="test_linear.py")
    assert behind.ret == FAILED, behind.output
    assert behind.status(case.check, case.dtype) == {"fail"}
    message = behind.output.split("not explained by any known divergence:", 1)[1]
    assert message.lstrip("\nE ").startswith(case.shows), message[:500]
    unexplained = [f for r in behind.results["rows"] for f, e in zip(r["failures"], r["explained_by"]) if e is None]
    assert unexplained and all(f.startswith(case.shows) and "]=" in f for f in unexplained)  # values, at an element


def test_an_entry_whose_check_passes_fails_the_run_unless_it_is_sometimes_seen(run_suite, tmp_path):
    selection = ("--subject", "catalogue:CorrectLoRALinear", "--dtype", "float32", "-k", "test_merge")
    strict = _known(tmp_path, "merge", "CorrectLoRALinear", "float32", "merged weight: dtype float16")
    run = run_suite(*selection, "--known-divergences", strict, module="test_linear.py")
    assert run.ret == FAILED, run.output
    assert run.status("merge", "float32") == {"now passing"}
    assert "known divergence not seen in this check: remove the entry" in run.output
    check = "test_linear.py::test_merge[catalogue:CorrectLoRALinear-float32]"
    assert f"line 1: {check} | subject merged weight: dtype float16" in run.output
    assert run.results["known_divergences"][0]["status"] == "now passing"

    (tmp_path / "known.txt").write_text(f"{check} @sometimes | merged weight: dtype float16  # rare\n")
    run = run_suite(*selection, "--known-divergences", str(tmp_path / "known.txt"), module="test_linear.py")
    assert run.ret == 0, run.output
    assert run.status("merge", "float32") == {"missed this run"}
    assert "1 missed this run in " in run.output.splitlines()[-1]


def test_an_intermittent_entry_never_seen_in_a_thorough_run_fails_it():
    entry = KnownDivergence("test_a.py::test_b[*]", parse_explanation("output: non-finite"), "rare", 4, sometimes=True)
    ran = [CheckRecord("test_a.py::test_b[x]", "s", "float32", "b", Status.MISSED_THIS_RUN)]
    assert plugin._divergence_status(entry, ran, thorough=False).status == Status.MISSED_THIS_RUN
    assert plugin._divergence_status(entry, ran, thorough=True).status == Status.NEVER_SEEN
    seen = [CheckRecord("test_a.py::test_b[x]", "s", "float32", "b", Status.KNOWN_DIVERGENCE, explained={"4": 3})]
    assert plugin._divergence_status(entry, seen, thorough=True).explained == 3


def test_a_subclass_subject_runs_as_itself(run_suite):
    run = run_suite(
        "--subject",
        "catalogue:UpstreamLoRADropsARank",
        "--dtype",
        "float32",
        "-k",
        "test_forward",
        module="test_linear.py",
    )
    assert run.ret == FAILED, run.output
    assert run.status("forward", "float32") == {"fail"}
    assert "subject output[" in run.output


def test_a_layer_that_is_not_of_the_subjects_class_fails_saying_so(run_suite):
    run = run_suite(
        "--subject",
        "catalogue:FromBaseBuildsAnother",
        "--dtype",
        "float32",
        "-k",
        "test_forward",
        module="test_linear.py",
    )
    assert run.ret == FAILED, run.output
    built = "catalogue.layers.FromBaseBuildsAnother.from_base built a mlx_lm.tuner.lora.LoRALinear"
    assert f"raised NotTheSubject: {built}" in run.output


def test_mlx_dora_embedding_is_judged_against_its_own_definition_and_a_regression_of_it_is_caught(run_suite, tmp_path):
    selection = ("--dtype", "float32", "-k", "test_forward or test_merge or test_as_linear")
    real = run_suite("--subject", "mlx_lm.DoRAEmbedding", *selection, module="test_dora_embedding.py")
    assert real.ret == 0, real.output
    assert {c["status"] for c in real.results["checks"]} == {"known divergence"}
    failures = {f.split(":")[0] for r in real.results["rows"] for f in r["failures"]}
    assert failures == {"subject magnitude"}, "only the magnitude's axis differs: values agree with MLX's definition"
    assert all(r["judged_at"] for r in real.results["rows"]), "the subject's values were compared"

    known = tmp_path / "known.txt"
    known.write_text(
        "test_dora_embedding.py::test_*[catalogue:UpstreamDoRAEmbeddingNormWithoutAdapter-*]"
        " | magnitude: convention  # per vocabulary row\n"
    )
    regression = run_suite(
        "--subject",
        "catalogue:UpstreamDoRAEmbeddingNormWithoutAdapter",
        *selection,
        "--known-divergences",
        str(known),
        module="test_dora_embedding.py",
    )
    assert regression.ret == FAILED, regression.output
    assert regression.status("forward", "float32") == {"fail"}
    assert regression.status("merge", "float32") == {"known divergence"}  # it changed the lookup only
    assert "not explained by any known divergence:" in regression.output and "subject output[" in regression.output
