"""Old releases are test material: the suite must catch the bugs they shipped.

Each release is installed into its own virtual environment (never over the one running the tests),
built by the gate and cached under ``.tox/gate``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
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


def test_an_adapter_mlx_vlm_0_4_4_saved_means_a_term_r_times_smaller_to_the_latest_and_is_not_converted(tmp_path):
    """mlx-vlm 0.4.4 scaled a saved adapter's term by ``alpha``; the latest loads the same file (its older schema:
    ``rank``, ``alpha``) without a word and scales it by ``alpha / rank``. The converter refuses the file: it cannot
    tell which release wrote it."""
    from mlx_vlm.trainer import load_adapters
    from mlx_vlm.utils import load_model

    from conformance import adapters as converter
    from foundation.dtypes import FLOAT32
    from foundation.model_cases import LoraSettings, ModelCase
    from foundation.model_files import mlx_directory, mlx_lm_adapter_directory
    from reference import models as reference
    from subjects import models as subject

    lora = LoraSettings(
        fine_tune_type="lora", num_layers=3, rank=4, scale=2.0, keys=("self_attn.q_proj", "mlp.up_proj")
    )
    case = ModelCase(
        "llama", FLOAT32, layers=3, heads=2, kv_heads=1, head_dim=4, intermediate=6, vocab=16, tied=False,
        lora=lora, batch=1, length=4, seed=3, adapter_scale=0.1, experts=0, experts_per_token=0,
    )  # fmt: skip
    saved = tmp_path / "saved by 0.4.4"
    python = release_environment("mlx-vlm==0.4.4")
    tokens = json.dumps(np.asarray(case.tokens).tolist())
    arguments = [mlx_directory(case), mlx_lm_adapter_directory(case), saved, lora.rank, lora.scale, tokens, tmp_path]
    run = subprocess.run(
        [str(python), "-c", SAVED_BY_0_4_4, *map(str, arguments)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((saved / "adapter_config.json").read_text()) == {"rank": 4, "alpha": 2.0, "dropout": 0.0}

    def contribution(logits) -> float:
        """The adapters' contribution to the logits, against the float64 model's with the term scaled by alpha."""
        meant = reference.oracle_logits(case) - reference.base_logits(case)
        return float(((logits - reference.base_logits(case)) * meant).sum() / (meant * meant).sum())

    assert round(contribution(np.load(tmp_path / "logits.npy")), 2) == 1.0  # 0.4.4 reads its own file as it meant it
    latest = load_model(mlx_directory(case))
    load_adapters(latest, str(saved))
    assert round(contribution(subject.logits(latest.eval(), case)) * lora.rank, 2) == 1.0  # 1/r of it, silently
    with pytest.raises(converter.NotConvertible, match="0.4.4 scales the term by alpha"):
        converter.read_mlx(saved)


SAVED_BY_0_4_4 = """
import json, sys, types
from pathlib import Path
import mlx.core as mx, mlx.nn as nn, numpy as np
from mlx_lm.utils import load_model
from mlx_vlm.trainer.utils import apply_lora_layers, get_peft_model, save_adapter

model_directory, adapters, saved, rank, alpha, tokens, out = sys.argv[1:]

def wrapped():  # the model as mlx-vlm 0.4.4 holds a language part
    model = nn.Module()
    model.language_model = load_model(Path(model_directory))[0]
    model.config = types.SimpleNamespace()
    return model

model = wrapped()
written = mx.load(str(Path(adapters) / "adapters.safetensors"))
keys = sorted({name.rsplit(".", 2)[-2] for name in written})
get_peft_model(model, keys, rank=int(rank), alpha=float(alpha), dropout=0.0, verbose=False)
names = {"lora_a": "A", "lora_b": "B"}  # 0.4.4's LoRaLayer holds A (in, r) and B (r, out), as mlx-lm's
weights = []
for name, w in written.items():
    path, _, leaf = name.rpartition(".")
    weights.append((f"language_model.{path}.{names[leaf]}", w))
model.load_weights(weights, strict=False)
save_adapter(model, Path(saved) / "adapters.safetensors")
again = apply_lora_layers(wrapped(), saved)
logits = again.language_model(mx.array(json.loads(tokens)))
np.save(Path(out) / "logits.npy", np.array(logits, dtype=np.float64))
"""
