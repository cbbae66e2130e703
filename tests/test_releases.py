"""Old releases are test material: the suite must catch the bugs they shipped.

Each release is installed into its own virtual environment (never over the one running the tests),
built by the gate and cached under ``.tox/gate``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from gate import environment, sources
from tests.conftest import GATE_ENVIRONMENTS, ROOT

pytestmark = [pytest.mark.release, pytest.mark.xdist_group("gate")]  # one worker builds the environment


def release_environment(requirement: str) -> Path:
    """The python of an environment with this suite (editable) and `requirement`, shared with the gate's tests."""
    source = sources.parse(requirement, "mlx-vlm")
    return environment.prepare(source, GATE_ENVIRONMENTS / source.slug())


def test_mlx_vlm_0_4_4_fails_loralayer_forward_with_the_lora_term_r_times_peft(tmp_path):
    python = release_environment("mlx-vlm==0.4.4")
    results = tmp_path / "results.json"
    run = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            str(ROOT / "conformance"),
            "-p",
            "no:cacheprovider",
            "--hypothesis-profile",
            "ci",
            "--subject",
            "mlx_vlm.LoRaLayer",
            "--results",
            str(results),
            "--report",
            str(tmp_path / "report.html"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "mlx-vlm 0.4.4" in run.stdout
    checks = json.loads(results.read_text())["checks"]
    statuses = {c["check_id"]: c["status"] for c in checks}
    dtypes = ("float32", "float16", "bfloat16")
    assert {statuses[f"test_linear.py::test_forward[mlx_vlm.LoRaLayer-{d}]"] for d in dtypes} == {"fail"}
    assert re.search(
        r"the LoRA term is \d+\.\d{3}× peft's \(= r: the raw alpha is used where alpha / r belongs", run.stdout
    )


def test_the_0_4_4_reports_standalone_script_reproduces_the_raw_alpha_bug_with_that_release(tmp_path):
    python = release_environment("mlx-vlm==0.4.4")
    results = tmp_path / "results.json"
    subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            str(ROOT / "conformance" / "test_linear.py"),
            "-p",
            "no:cacheprovider",
            "-k",
            "test_forward",
            "--dtype",
            "float32",
            "--subject",
            "mlx_vlm.LoRaLayer",
            "--results",
            str(results),
            "--report",
            str(tmp_path / "report.html"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    summary = (tmp_path / "report.md").read_text()
    assert "mlx-vlm 0.4.4" in summary and "the LoRA term is" in summary
    script = tmp_path / "repro.py"
    rendered = subprocess.run(
        [str(python), "-c", RENDER_SCRIPT, str(results), str(script)], capture_output=True, text=True, cwd=tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr
    run = subprocess.run([str(python), str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "DISAGREE" in run.stdout, run.stdout + run.stderr
    imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert any(line.startswith("from mlx_vlm.") for line in imports)
    assert not any("conformance" in line or "reference" in line for line in imports)


RENDER_SCRIPT = """
import sys
from pathlib import Path
from reports import repro, results
run = results.load([Path(sys.argv[1])])
row = next(r for r in run.failing_case_by_check().values() if r.check == "forward")
Path(sys.argv[2]).write_text(repro.script(row, run.runs[0]["subjects"][row.subject]))
"""
