"""Old releases are test material: the suite must catch the bugs they shipped.

Each release is installed into its own virtual environment (never over the one running the tests),
cached under ``.tox/releases``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.release


def release_environment(requirement: str) -> Path:
    """A virtual environment with this suite (editable) and `requirement`; its python."""
    venv = ROOT / ".tox" / "releases" / requirement.replace("==", "-")
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        torch = ["torch==2.13.0"] if sys.platform == "linux" else []
        install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*install, *torch, "-e", str(ROOT), requirement], check=True)
        ready.touch()
    return python


def test_mlx_vlm_0_4_4_fails_loralayer_forward_with_the_lora_term_r_times_peft(tmp_path):
    python = release_environment("mlx-vlm==0.4.4")
    results = tmp_path / "results.json"
    run = subprocess.run(
        [str(python), "-m", "pytest", str(ROOT / "conformance"), "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
         "--subject", "mlx_vlm.LoRaLayer", "--results", str(results)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "mlx-vlm 0.4.4" in run.stdout
    checks = json.loads(results.read_text())["checks"]
    statuses = {c["check_id"]: c["status"] for c in checks}
    dtypes = ("float32", "float16", "bfloat16")
    assert {statuses[f"test_linear.py::test_forward[mlx_vlm.LoRaLayer-{d}]"] for d in dtypes} == {"fail"}
    assert re.search(r"the LoRA term is \d+\.\d{3}× peft's \(= r: the raw alpha is used where alpha / r belongs", run.stdout)
