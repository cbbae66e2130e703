"""Reports rendered from results files: merging, the matrix, the Markdown summary, the HTML and its scripts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from foundation.schema import Status
from reports import __main__ as reports_cli
from reports import figures, html, markdown, matrix, repro
from reports.results import ResultsError, load, merge
from tests.conftest import RECORDED_SUBJECTS, ROOT
from tests.documents import META, divergence
from tests.documents import check as _check
from tests.documents import document as _document
from tests.documents import row as _row

pytestmark = pytest.mark.xdist_group("recorded_run")  # one worker records the run they share


def test_matrix_has_a_table_per_subject_and_the_most_severe_status_first():
    results = merge(
        [
            _document(
                [
                    _check("test_linear.py::test_forward[s-float32]", "s", "float32", "forward", "pass"),
                    _check("test_quantized_linear.py::test_merge[s-float32-affine]", "s", "float32", "merge", "pass"),
                    _check(
                        "test_quantized_linear.py::test_merge[s-float32-mxfp4]",
                        "s",
                        "float32",
                        "merge",
                        "known divergence",
                    ),
                    _check("test_linear.py::test_forward[s-float16]", "s", "float16", "forward", "fail"),
                    _check(
                        "test_quantized_linear.py::test_quantized_matmul_accumulation[float16]",
                        "None",
                        "float16",
                        "x",
                        "pass",
                    ),
                ]
            )
        ]
    )
    lines = matrix.render(results).splitlines()
    assert lines[0] == "**s**"
    assert "| module:check | float32 | float16 |" in lines
    assert "| linear:forward | pass | fail |" in lines
    assert "| quantized_linear:merge | known div. / pass | – |" in lines
    assert not any("None" in line for line in lines)


def test_files_of_one_configuration_merge_into_one_matrix_and_releases_stay_apart():
    f32 = _check("test_linear.py::test_forward[s-float32]", "s", "float32", "forward", "pass")
    f16 = _check("test_linear.py::test_forward[s-float16]", "s", "float16", "forward", "fail")
    shards = merge([_document([f32]), _document([f16])])
    assert "| linear:forward | pass | fail |" in matrix.render(shards).splitlines()
    old = dict(META, versions={"mlx": "1", "mlx-vlm": "0.4.4"})
    releases = matrix.render(merge([_document([f32]), _document([f32 | {"status": "fail"}], old)]))
    assert "**s (mlx-vlm 0.7.10)**" in releases and "**s (mlx-vlm 0.4.4)**" in releases


def test_a_known_divergence_merged_from_several_files_keeps_its_most_severe_status():
    results = merge(
        [
            _document([], divergences=[divergence("test_linear.py::*", "missed this run")]),
            _document([], divergences=[divergence("test_linear.py::*", "known divergence")]),
        ]
    )
    assert [d.status for d in results.known_divergences] == [Status.KNOWN_DIVERGENCE]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        (json.dumps({"format": 99}), "not a results file of format 1"),
        (json.dumps({"format": 1, "meta": {}}), "incomplete results file, missing rows, checks, known_divergences"),
        (
            json.dumps({"format": 1, "meta": {}, "rows": [], "known_divergences": [], "checks": [{"check_id": "t"}]}),
            "not of this suite's schema: a CheckRecord without check, dtype, status, subject",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "meta": {},
                    "rows": [],
                    "known_divergences": [],
                    "checks": [{"check_id": "t", "subject": "s", "dtype": "d", "check": "c", "status": "great"}],
                }
            ),
            "a CheckRecord with the unknown status 'great'",
        ),
    ],
)
def test_bad_results_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        load([path])
    with pytest.raises(SystemExit) as exit:
        reports_cli.main([str(path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_report_path_is_a_clear_error(recorded_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        reports_cli.main([str(recorded_run.results), "--html", str(blocker / "report.html")])
    assert "cannot write" in capsys.readouterr().err


def test_every_run_writes_the_report_and_summary_beside_its_results(recorded_run):
    assert recorded_run.ret == 1, recorded_run.output
    assert f"report -> {recorded_run.report}" in recorded_run.output
    assert f"report: {recorded_run.report}" in recorded_run.output
    summary = recorded_run.report.with_suffix(".md").read_text()
    assert "### New failures:" in summary and "the LoRA term is 2.000× peft's" in summary
    assert "test_linear.py::test_forward[catalogue:RawAlpha-bfloat16]" in summary  # seen as a known divergence
    assert f"Full report: `{recorded_run.report}`" in summary


def test_python_m_reports_renders_the_same_report_from_the_results_alone(recorded_run, tmp_path):
    again = tmp_path / "again.html"
    assert reports_cli.main([str(recorded_run.results), "--html", str(again)]) == 0
    assert again.read_text() == recorded_run.report.read_text()
    assert again.with_suffix(".md").exists()


def test_worker_shards_merge_into_the_report_of_the_whole_run(recorded_run, tmp_path):
    document = json.loads(recorded_run.results.read_text())
    halves = []
    for part in (0, 1):
        shard = dict(document, rows=document["rows"][part::2], checks=document["checks"][part::2])
        halves.append(tmp_path / f"shard{part}.json")
        halves[-1].write_text(json.dumps(shard))
    whole, sharded = load([recorded_run.results]), load(halves)
    assert matrix.render(sharded) == matrix.render(whole)

    def written(rows):
        return sorted(json.dumps(row.to_json(), sort_keys=True) for row in rows)

    assert whole.rows and written(sharded.rows) == written(whole.rows)
    assert markdown.render(sharded).count("| catalogue:") == markdown.render(whole).count("| catalogue:")


def test_the_html_report_holds_no_external_reference(recorded_run):
    page = recorded_run.report.read_text()
    assert "<svg" in page and "data:image/png;base64," in page
    assert not any(f'{attribute}="http' in page for attribute in ("src", "href"))
    assert "<link" not in page and "@import" not in page


def _script_run(path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}  # the wrong variants live in catalogue/
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=environment, timeout=300)


WRONG = [name for name in RECORDED_SUBJECTS if not name.startswith("Correct")]


@pytest.mark.parametrize("variant", WRONG)
def test_a_failure_cards_standalone_script_shows_the_disagreement(recorded_run, variant, tmp_path):
    results = load([recorded_run.results])
    cards = [card for card in html.view(results)["cards"] if card["subject"] == f"catalogue:{variant}"]
    assert cards, f"{variant}: no failure card"
    scripted = [c for c in cards if c["row"] and c["row"].dtype == "float32" and c["script"]]
    assert scripted, f"{variant}: no script: {[c.get('no_script') for c in cards]}"
    card = scripted[0]
    script = tmp_path / "repro.py"
    script.write_text(card["script"])
    run = _script_run(script)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "DISAGREE" in run.stdout or "Error" in run.stderr, run.stdout + run.stderr
    imported = {line.split()[1] for line in card["script"].splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {
        "base64",
        "sys",
        "mlx.core",
        "mlx.nn",
        "numpy",
        "torch",
        "peft",
        "peft.tuners.lora.layer",
        "mlx.utils",
        "catalogue.layers",
    }


@pytest.mark.parametrize("correct", [name for name in RECORDED_SUBJECTS if name.startswith("Correct")])
def test_the_script_of_a_correct_layers_closest_case_agrees(recorded_run, correct, tmp_path):
    results = load([recorded_run.results])
    subject = results.runs[0]["subjects"][f"catalogue:{correct}"]
    rows = [
        r for r in results.rows if r.subject == f"catalogue:{correct}" and repro.unsupported_reason(r, subject) is None
    ]
    closest = max(rows, key=lambda r: r.margin)
    script = tmp_path / "repro.py"
    script.write_text(repro.script(closest, subject))
    run = _script_run(script)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "agree within the allowed error" in run.stdout


def test_a_case_too_large_for_a_script_says_so():
    row = _row(
        "test_linear.py::test_forward[s-float32]",
        "forward",
        {"in_features": 256, "out_features": 256, "r": 8, "batch_shape": [4]},
    )
    reason = repro.unsupported_reason(row, {"convention": "LoRALinearConvention"})
    assert reason and "more than the 4096 a script embeds" in reason
    assert "standalone scripts cover forward and merge" in repro.unsupported_reason(
        dataclasses.replace(row, check="dropout"), {}
    )


def test_a_run_with_nothing_measured_still_renders(tmp_path):
    absent = _check("test_linear.py::test_forward[s-float32]", "s", "float32", "forward", "not provided")
    page = html.render(merge([_document([absent])]))
    assert "<strong>0</strong> cases checked" in page and "1 not provided" in page
    assert "No new failure" in markdown.render(merge([_document([absent])]))


def test_a_gradient_script_needs_the_subjects_recorded_roles():
    row = _row(
        "test_linear.py::test_grad[s-float32]", "grad", {"in_features": 2, "out_features": 2, "r": 1, "batch_shape": []}
    )
    assert "parameter roles" in repro.unsupported_reason(row, {"convention": "LoRALinearConvention"})
    assert repro.unsupported_reason(row, {"convention": "LoRALinearConvention", "roles": {"lora_a": "A"}}) is None


def test_every_report_shows_the_verdicts_measured_figures_with_their_commands():
    from reports import verdict_study

    study = verdict_study.load()
    page = html.render(
        merge([_document([_check("test_linear.py::test_forward[s-float32]", "s", "float32", "forward", "pass")])])
    )
    assert study["false_alarms"] and study["detection"], "run python -m studies.publish"
    assert "Not measured yet" not in page
    for entry in (study["false_alarms"][0], study["detection"][0]):
        assert f"<code>{entry['command']}</code>".replace("'", "&#39;") in page


def test_a_figure_says_which_cases_it_cannot_place_and_draws_known_divergences_apart():
    case = {"dtype": "float32", "in_features": 8}
    exact = [_row("t", "init", case, verdict="pass", margin=None) for _ in range(3)]
    assert "not plotted: 3 of 3 cases: 3 agreed exactly where no error is allowed" in figures.check_figure(exact, "x")
    known = _row("t", "forward", case, margin=5.0, failures=["f"], explained_by=["line 1"])
    drawn = figures.check_figure([known, _row("t", "forward", case, verdict="pass", margin=0.5)], "x")
    assert figures.KNOWN in drawn and "not plotted" not in drawn
    raised = _row("t", "init", case, margin=None, failures=["raised"], explained_by=["line 2"])
    assert "1 failed as known divergences, with no finite error" in figures.check_figure([raised], "x")
