"""Old releases are test material: the suite must catch the bugs they shipped.

Each release is installed into its own virtual environment (never over the one running the tests),
built by the gate and cached under ``.tox/gate``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gate import environment, sources
from tests.conftest import GATE_ENVIRONMENTS, ROOT, building, to_terminal

pytestmark = [pytest.mark.release, pytest.mark.xdist_group("gate")]  # one worker builds the environment


def release_environment(requirement: str, package: str = "mlx-vlm") -> Path:
    """The python of an environment with this suite (editable) and `requirement` (of `package`), shared with the
    gate's tests."""
    source = sources.parse(requirement, package)
    with to_terminal() if building(requirement, package) else contextlib.nullcontext():  # its steps are shown
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


def test_an_adapter_mlx_lm_0_28_2_saved_for_a_mixture_is_refused_by_the_latest_and_converted_to_the_same_file(
    tmp_path,
):
    """mlx-lm 0.28.2 kept a layer of experts' A as (r·experts, in); 0.28.3 on keep (experts, r, in). The latest
    refuses 0.28.2's file with an error that names the shape; the converter reads it as the same adapters (0.28.2's
    own layers compute their function from it), and writes the peft file the new layout gives."""
    import torch
    from safetensors.torch import load_file

    from conformance import adapters as converter
    from foundation.dtypes import FLOAT32
    from foundation.model_cases import LoraSettings, ModelCase
    from foundation.model_files import mlx_lm_adapter_directory
    from subjects import models as subject

    lora = LoraSettings(fine_tune_type="lora", num_layers=2, rank=2, scale=2.0, keys=None)
    case = ModelCase(
        "qwen3_moe", FLOAT32, layers=3, heads=2, kv_heads=1, head_dim=4, intermediate=6, vocab=16, tied=False,
        lora=lora, batch=1, length=4, seed=3, adapter_scale=0.1, experts=3, experts_per_token=2,
    )  # fmt: skip
    new = mlx_lm_adapter_directory(case)
    python = release_environment("mlx-lm==0.28.2", "mlx-lm")
    run = subprocess.run(
        [str(python), "-c", SAVED_BY_0_28_2, str(new), str(tmp_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    old = tmp_path / "saved by 0.28.2"
    shapes = {name: tuple(w.shape) for name, w in load_file(str(old / "adapters.safetensors")).items()}
    assert shapes["model.layers.2.mlp.switch_mlp.up_proj.lora_a"] == (2 * 3, 8)  # (r·experts, in)

    # 0.28.2's layer computes, from what it saved, the LoRA term of the adapters in the new layout
    term = np.load(tmp_path / "term.npy")
    a, b = case.adapters["model.layers.2.mlp.switch_mlp.up_proj"]  # (experts, r, in), (experts, out, r)
    x, chosen = np.load(tmp_path / "x.npy"), np.load(tmp_path / "indices.npy")
    a64, b64, x64 = (values.astype(np.float64) for values in (a, b, x))

    def term_of(a, b, x):
        return np.stack([[lora.scale * (b[e] @ (a[e] @ x[t, 0])) for e in chosen[t]] for t in range(x.shape[0])])

    # float32's worst case for two nested sums (of `in` then r products) and the scale: gamma_n of the magnitudes
    n = a.shape[2] + a.shape[1] + 1
    gamma = n * FLOAT32.unit_roundoff / (1 - n * FLOAT32.unit_roundoff)
    error = np.abs(term[:, :, 0] - term_of(a64, b64, x64))
    assert np.all(error <= gamma * term_of(np.abs(a64), np.abs(b64), np.abs(x64))), error.max()

    with pytest.raises(ValueError, match="lora_a"):
        subject.MlxLmEntryPoints().adapted(case, old)
    for source, out in ((new, "from new"), (old, "from old")):
        assert converter.main(["to-peft", str(source), str(tmp_path / out)]) == 0
    first, second = (load_file(str(tmp_path / out / "adapter_model.safetensors")) for out in ("from new", "from old"))
    assert set(first) == set(second) and all(torch.equal(first[name], second[name]) for name in first)


SAVED_BY_0_28_2 = """
import json, shutil, sys
from pathlib import Path
import mlx.core as mx, mlx.nn as nn, numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

new, out = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((new / "adapter_config.json").read_text())
written = mx.load(str(new / "adapters.safetensors"))
root = nn.Module()
root.model = nn.Module()
root.model.layers = [nn.Module() for _ in range(1 + max(int(n.split(".")[2]) for n in written))]
for name in [n for n in written if n.endswith(".lora_a")]:
    path = name.removesuffix(".lora_a")
    a, b = written[name], written[f"{path}.lora_b"]
    if a.ndim == 3:  # this release's own layer of experts, its A given in its own layout
        experts, rank, inputs = a.shape
        layer = LoRASwitchLinear(inputs, b.shape[1], experts, r=rank, scale=config["lora_parameters"]["scale"])
        layer.lora_a, layer.lora_b = a.reshape(experts * rank, inputs), b
    else:
        layer = LoRALinear(a.shape[0], b.shape[1], r=a.shape[1])
        layer.lora_a, layer.lora_b = a, b
    layer.linear.freeze()
    parent = root.model.layers[int(path.split(".")[2])]
    *inner, leaf = path.split(".")[3:]
    for part in inner:
        if part not in parent:
            parent[part] = nn.Module()
        parent = parent[part]
    parent[leaf] = layer
    if path == "model.layers.2.mlp.switch_mlp.up_proj":
        layer.linear.weight = mx.zeros_like(layer.linear.weight)
        x = mx.random.normal((5, 1, 1, inputs), key=mx.random.key(0))
        indices = mx.array([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
        term = layer(x, indices)
        for file, values in (("term", term), ("x", x[:, 0]), ("indices", indices)):
            np.save(out / f"{file}.npy", np.array(values))
saved = out / "saved by 0.28.2"
saved.mkdir()
mx.save_safetensors(str(saved / "adapters.safetensors"), dict(tree_flatten(root.trainable_parameters())))
shutil.copy(new / "adapter_config.json", saved)
"""
