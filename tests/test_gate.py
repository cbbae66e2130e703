"""The gate: sources, regression mode, exit codes, and whole runs on real and stand-in mlx-vlm sources.

The whole runs build environments (cached under ``.tox/gate`` for pinned releases) and need the
package index, so they are marked ``release``; they share one xdist group, so each environment is
built once. They restrict the suite to ``test_linear.py`` in float32 (``-- -k test_linear.py --dtype float32``),
where LoRaLayer's checks are (the fix of the raw alpha keeps every dtype, to count them); what they test is the
gate, which sees no difference between dtypes; the README's commands run the suite whole.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from foundation.schema import DivergenceRecord
from gate import NEW_FAILURE, PASSED, SETUP_FAILED, USAGE_ERROR, SetupError, outcome, sources
from gate import __main__ as gate_cli
from reports import markdown
from reports.regression import compare
from reports.results import merge
from tests.conftest import GATE_ENVIRONMENTS, LINEAR_ONLY, ROOT, run_gate
from tests.documents import divergence, document, forward, model_logits

PULL_REQUEST = ROOT / "tests" / "fixtures" / "mlx-vlm-pull-request"
RAW_ALPHA = "the LoRA term is 2.000× peft's (= r: the raw alpha is used where alpha / r belongs"


# --- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "pip_argument", "pinned"),
    [
        ("mlx-vlm==0.4.4", "requirement", "mlx-vlm==0.4.4", True),
        ("mlx_vlm == 0.4.4", "requirement", "mlx_vlm == 0.4.4", True),
        ("mlx-vlm", "requirement", "mlx-vlm", False),
        ("mlx-vlm>=0.5", "requirement", "mlx-vlm>=0.5", False),
        (
            "git+https://github.com/Blaizzy/mlx-vlm.git@main",
            "git",
            "git+https://github.com/Blaizzy/mlx-vlm.git@main",
            False,
        ),
        (
            "https://github.com/Blaizzy/mlx-vlm.git@" + "a" * 40,
            "git",
            "git+https://github.com/Blaizzy/mlx-vlm.git@" + "a" * 40,
            True,
        ),
    ],
)
def test_a_source_is_a_requirement_or_a_git_url_and_only_exact_ones_are_pinned(text, kind, pip_argument, pinned):
    source = sources.parse(text, "mlx-vlm")
    assert (source.kind, source.pip_argument(), source.pinned) == (kind, pip_argument, pinned)


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("mlx-vlm==0.4.4", "mlx-vlm-0.4.4"),
        ("git+https://github.com/Blaizzy/mlx-vlm.git@" + "a" * 40, "mlx-vlm-git-mlx-vlm-aaaaaaaaaaaa"),
        ("git+https://github.com/Blaizzy/mlx-vlm", "mlx-vlm-git-mlx-vlm"),
        ("git+file:///tmp/pull-request@main", "mlx-vlm-git-pull-request-main"),
    ],
)
def test_each_source_gets_an_environment_folder_named_after_it(text, slug):
    assert sources.parse(text, "mlx-vlm").slug() == slug


def test_a_source_tree_is_installed_from_its_absolute_path():
    source = sources.parse(str(PULL_REQUEST), "mlx-vlm")
    assert (source.kind, source.pip_argument(), source.pinned) == ("path", str(PULL_REQUEST), False)
    assert source.slug() == "mlx-vlm-mlx-vlm-pull-request"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/no/such/tree", "source /no/such/tree: no such directory"),
        (str(ROOT / "tests" / "fixtures"), "not a Python source tree (no pyproject.toml or setup.py)"),
        ("mlx-lm==0.30", "source 'mlx-lm==0.30' names mlx-lm, but the gate tests mlx-vlm (see --package)"),
        ("==0.4.4", "not a path, a git URL or a requirement"),
    ],
)
def test_an_unusable_source_is_a_one_line_setup_error(text, message):
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sources.parse(text, "mlx-vlm")


# --- regression mode -----------------------------------------------------------------------------


def _results(*checks: dict, divergences: list[dict] = ()):
    return merge([document(list(checks), divergences=divergences)])


def test_without_a_base_every_failing_check_is_new():
    comparison = compare(_results(forward("s", "float32", "fail"), forward("s", "float16", "pass")))
    assert [c.check_id for c in comparison.new_failures] == ["test_linear.py::test_forward[s-float32]"]
    assert not comparison.passed


def test_with_a_base_only_checks_that_did_not_fail_there_are_new():
    base = _results(
        forward("old", "float32", "fail"),
        forward("fixed", "float32", "fail"),
        forward("broken", "float32", "pass"),
        forward("moved", "float32", "pass"),
    )
    now = _results(
        forward("old", "float32", "fail"),
        forward("fixed", "float32", "pass"),
        forward("broken", "float32", "fail"),
        forward("moved", "float32", "not provided"),
        forward("added", "float32", "fail"),
    )
    comparison = compare(now, base)
    assert [c.subject for c in comparison.new_failures] == ["broken", "added"]
    assert [c.subject for c in comparison.failing_in_base_too] == ["old"]
    assert [c.subject for c in comparison.fixed] == ["fixed"]
    assert [c.subject for c in comparison.no_longer_provided] == ["moved"]
    summary = markdown.render(now, comparison=comparison)
    assert "### New failures: 2 check(s), 2 root cause(s)" in summary
    assert "### Failing in the base too: 1 check(s), 1 root cause(s) (not counted against this change)" in summary
    assert "### Fixed since the base: 1" in summary and "### No longer provided: 1" in summary
    assert "- base: mlx 1 · mlx-vlm 0.7.10" in summary


def test_a_change_of_verdict_on_saved_adapter_files_is_flagged_as_a_change_of_what_they_mean():
    """A check of saved adapter files that passes on one side and fails on the other: the same file gives the two
    sides different functions, whichever is right (the raw-alpha fix changed what every saved adapter meant)."""
    base = _results(
        model_logits("lm", "float32", "fail"), model_logits("lm", "bfloat16", "pass"), forward("s", "float32", "fail")
    )
    now = _results(
        model_logits("lm", "float32", "pass"), model_logits("lm", "bfloat16", "fail"), forward("s", "float32", "pass")
    )
    comparison = compare(now, base)
    assert [(c.check_id, c.status.value) for c in comparison.saved_adapters_changed] == [
        ("test_models.py::test_logits[lm-bfloat16]", "fail"),
        ("test_models.py::test_logits[lm-float32]", "pass"),
    ]
    assert not compare(now, None).saved_adapters_changed and not compare(now, now).saved_adapters_changed
    summary = markdown.render(now, comparison=comparison)
    assert "### Saved adapters change meaning: 2" in summary
    assert "- `test_models.py::test_logits[lm-float32]`: now passes" in summary
    lines = outcome.console_lines(now, comparison)
    assert any(line.startswith("gate: saved adapters change meaning: 2 check(s)") for line in lines)
    assert "  test_models.py::test_logits[lm-bfloat16]: now fails" in lines


def test_the_checks_of_saved_adapter_files_are_the_model_checks_that_load_them():
    from conformance.families import judges_saved_adapters

    for module, name in [("test_models.py", n) for n in ("logits", "adapters_in_peft", "adapters_from_peft")] + [
        ("test_quantized_models.py", "logits")
    ]:
        assert judges_saved_adapters(f"{module}::test_{name}[x-float32]", name), (module, name)
    for module, name in [("test_models.py", "fuse"), ("test_models.py", "steps_sgd"), ("test_linear.py", "forward")]:
        assert not judges_saved_adapters(f"{module}::test_{name}[x-float32]", name), (module, name)


def test_a_known_divergence_that_now_passes_is_reported_as_fixed_whatever_the_base():
    entry = divergence("test_linear.py::test_merge[s-*]", "now passing", ["test_linear.py::test_merge[s-float32]"])
    now = _results(forward("s", "float32", "pass"), divergences=[entry])
    for base in (None, _results(forward("s", "float32", "pass"))):
        comparison = compare(now, base)
        assert comparison.passed and comparison.now_passing_divergences == [DivergenceRecord.from_json(entry)]
        assert "- `test_linear.py::test_merge[s-float32]`" in markdown.render(now, comparison=comparison)


# --- the decision and the command line -----------------------------------------------------------


def _write(path: Path, *checks: dict) -> Path:
    path.write_text(json.dumps(document(list(checks))))
    return path


def _decide(tmp_path: Path, results: Path, *args: str) -> int:
    html, md = tmp_path / "report.html", tmp_path / "summary.md"
    return outcome.main([str(results), "--html", str(html), "--markdown", str(md), "--package", "mlx-vlm", *args])


def test_the_outcome_is_1_on_a_new_failure_and_0_when_the_base_failed_too(tmp_path, capsys):
    failing = _write(tmp_path / "now.json", forward("mlx_vlm.LoRaLayer", "float32", "fail"))
    assert _decide(tmp_path, failing) == NEW_FAILURE
    assert "gate: 1 new failure(s)" in capsys.readouterr().out
    assert _decide(tmp_path, failing, "--baseline", str(failing)) == PASSED
    printed = capsys.readouterr().out
    assert "gate: no new failure against the base" in printed and "failing in the base too, not counted: 1" in printed
    assert "### No new failure" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "report.html").stat().st_size > 0


def test_a_run_where_nothing_was_provided_is_a_setup_failure_not_a_pass(tmp_path, capsys):
    nothing = _write(tmp_path / "now.json", forward("mlx_vlm.LoRaLayer", "float32", "not provided"))
    assert _decide(tmp_path, nothing) == SETUP_FAILED
    assert (
        "gate: set-up failed: mlx-vlm 0.7.10 provides none of the subjects the suite knows" in capsys.readouterr().out
    )


def test_an_unreadable_baseline_is_a_setup_failure(tmp_path, capsys):
    results = _write(tmp_path / "now.json", forward("s", "float32", "pass"))
    (tmp_path / "base.json").write_text("{")
    assert _decide(tmp_path, results, "--baseline", str(tmp_path / "base.json")) == SETUP_FAILED
    assert "gate: set-up failed: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["/no/such/tree"], SETUP_FAILED, "gate: set-up failed: source /no/such/tree: no such directory"),
        (
            ["mlx-vlm", "--baseline", "/no/such.json"],
            SETUP_FAILED,
            "gate: set-up failed: --baseline /no/such.json: no such file",
        ),
        (["mlx-vlm", "--package", "mlx-lm"], SETUP_FAILED, "names mlx-vlm, but the gate tests mlx-lm"),
    ],
)
def test_bad_inputs_exit_with_the_setup_code_and_one_line_before_building_anything(
    tmp_path, capsys, args, code, message
):
    assert gate_cli.main([*args, "--out", str(tmp_path / "out"), "--env-dir", str(tmp_path / "envs")]) == code
    assert message in capsys.readouterr().out
    assert not (tmp_path / "envs").exists()


def test_an_unknown_option_or_an_unwritable_out_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gate_cli.main(["mlx-vlm", "--profil", "ci"])
    assert exit_.value.code == USAGE_ERROR
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert gate_cli.main(["mlx-vlm", "--out", str(blocker / "out")]) == USAGE_ERROR
    assert f"--out {blocker / 'out'}: cannot write" in capsys.readouterr().err


def test_a_source_tree_pip_cannot_build_exits_with_the_setup_code_and_pips_reason(tmp_path):
    tree = tmp_path / "broken"
    tree.mkdir()
    (tree / "pyproject.toml").write_text("[project\nname = 'mlx-vlm'\n")
    run = run_gate(tmp_path, str(tree), env_dir=tmp_path / "envs")
    assert run.returncode == SETUP_FAILED, run.stdout
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith(f"gate: set-up failed: cannot install the source {tree}: ERROR:"), last


# --- whole runs ----------------------------------------------------------------------------------


def _summary(tmp_path: Path) -> str:
    return (tmp_path / "out" / "summary.md").read_text()


LATEST = f"mlx-vlm=={importlib.metadata.version('mlx-vlm')}"
"""The latest release, as tox installed it for these tests; pinned, so its environment is built once."""


@pytest.fixture(scope="session")
def latest_results(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp_path = tmp_path_factory.mktemp("latest")
    return run_gate(tmp_path, LATEST, *LINEAR_ONLY), tmp_path / "out" / "conformance.json"


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_the_latest_release_passes_the_gate_and_lists_its_known_divergences(latest_results):
    run, results = latest_results
    assert run.returncode == PASSED, run.stdout[-3000:] + run.stderr
    assert "gate: no new failure" in run.stdout
    assert "gate: known divergences seen (not failures):" in run.stdout
    assert "test_linear.py::test_merge[mlx_vlm.LoRaLayer-float32]: replace_lora_with_linear raises" in run.stdout
    out = results.parent
    assert {p.name for p in out.iterdir()} >= {
        "conformance.json",
        "junit.xml",
        "report.html",
        "summary.md",
        "pytest.log",
    }
    assert "<testsuite" in (out / "junit.xml").read_text()


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_mlx_vlm_0_4_4_fails_the_gate_naming_loralayers_scaling_once_for_all_its_checks(gate_on_0_4_4):
    run, out = gate_on_0_4_4
    assert run.returncode == NEW_FAILURE, run.stdout[-3000:] + run.stderr
    cause = "mlx_vlm.LoRaLayer: the LoRA scale is off by a factor r: the raw alpha is used where alpha / r belongs"
    assert "gate: root cause 1 of " in run.stdout and cause in run.stdout
    assert f"  shown on test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]: {RAW_ALPHA}" in run.stdout
    assert f"  replay: {GATE_ENVIRONMENTS / 'mlx-vlm-0.4.4' / 'bin' / 'python'} -m conformance.replay" in run.stdout
    assert "Traceback" not in run.stdout and "AssertionError" not in run.stdout
    assert "AssertionError" in (out / "pytest.log").read_text()  # the tracebacks are kept there
    summary = (out / "summary.md").read_text()
    assert "mlx-vlm 0.4.4" in summary and f"#### 1. {cause}" in summary
    assert "| mlx_vlm.LoRaLayer | `test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]` |" in summary


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_regression_mode_against_the_latest_release_reports_only_0_4_4s_new_failures(tmp_path, latest_results):
    _, baseline = latest_results
    run = run_gate(tmp_path, "mlx-vlm==0.4.4", "--baseline", str(baseline), *LINEAR_ONLY)
    assert run.returncode == NEW_FAILURE, run.stdout[-3000:] + run.stderr
    now = json.loads((tmp_path / "out" / "conformance.json").read_text())
    failing = {c["check_id"] for c in now["checks"] if c["status"] == "fail"}
    assert failing and {c.split("[")[1].split("-")[0] for c in failing} == {"mlx_vlm.LoRaLayer"}
    assert f"gate: {len(failing)} new failure(s) against the base" in run.stdout
    assert "gate: ran in the base, not provided now:" in run.stdout  # 0.4.4 has no LoRALinear
    again = run_gate(tmp_path, "mlx-vlm==0.4.4", "--baseline", str(tmp_path / "out" / "conformance.json"), *LINEAR_ONLY)
    assert again.returncode == PASSED, again.stdout[-3000:]
    assert f"gate: failing in the base too, not counted: {len(failing)}" in again.stdout


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_the_fix_of_the_raw_alpha_bug_against_a_base_source_of_0_4_4_reports_the_fixed_checks(tmp_path):
    run = run_gate(tmp_path, LATEST, "--base", "mlx-vlm==0.4.4", "--", "-k", "test_linear.py and test_forward")
    assert run.returncode == PASSED, run.stdout[-3000:] + run.stderr
    assert "gate: the base, mlx-vlm==0.4.4, to make the baseline" in run.stdout
    fixed = [f"test_linear.py::test_forward[mlx_vlm.LoRaLayer-{dtype}]" for dtype in ("float32", "float16", "bfloat16")]
    assert "gate: fixed since the base: 3\n" + "".join(f"  {c}: mlx_vlm.LoRaLayer\n" for c in fixed) in run.stdout
    assert "### Fixed since the base: 3" in _summary(tmp_path)
    assert (tmp_path / "out" / "base" / "conformance.json").exists()


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_a_pull_requests_source_tree_that_drops_the_bias_fails_naming_the_bug(tmp_path):
    tree = tmp_path / "pull-request"
    shutil.copytree(PULL_REQUEST, tree)  # pip builds in the tree; keep the repository's copy clean
    run = run_gate(tmp_path, str(tree), *LINEAR_ONLY, env_dir=tmp_path / "envs")
    assert run.returncode == NEW_FAILURE, run.stdout[-3000:] + run.stderr
    assert "gate:   installed the suite" in run.stdout, "building an environment names its steps"
    dropped = "the output is off by exactly minus the bias: the bias is dropped"
    assert f"  shown on test_linear.py::test_forward[mlx_vlm.LoRaLayer-float32]: {dropped}" in run.stdout
    assert dropped in _summary(tmp_path)
    assert (
        "gate: known divergence now passing, drop or narrow its entry: test_linear.py::test_merge[mlx_vlm.LoRaLayer"
        in run.stdout
    )


@pytest.mark.release
@pytest.mark.xdist_group("gate")
def test_a_git_url_at_a_commit_is_installed_like_a_pull_requests_checkout(tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(PULL_REQUEST, repository)
    git = ["git", "-C", str(repository), "-c", "user.name=gate", "-c", "user.email=gate@example.invalid"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "drops the bias"]):
        subprocess.run([*git, *command], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    source = f"git+file://{repository}@{commit}"
    forward_only = ("--", "-k", "test_linear.py and test_forward", "--dtype", "float32")
    run = run_gate(tmp_path, source, *forward_only, env_dir=tmp_path / "envs")
    assert run.returncode == NEW_FAILURE, run.stdout[-3000:] + run.stderr
    assert f"mlx-vlm 0.7.10+pull.request.drops.bias from {source}" in run.stdout
    assert "the bias is dropped" in run.stdout


@pytest.mark.release
def test_a_release_that_does_not_exist_exits_with_the_setup_code_and_pips_reason(tmp_path):
    run = run_gate(tmp_path, "mlx-vlm==0.0.0", env_dir=tmp_path / "envs")
    assert run.returncode == SETUP_FAILED, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == (
        "gate: set-up failed: cannot install the source mlx-vlm==0.0.0: "
        "ERROR: No matching distribution found for mlx-vlm==0.0.0"
    )
