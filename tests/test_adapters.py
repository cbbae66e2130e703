"""The adapter converter (`conformance.adapters`): a file converted from one side loads with the other side's own
loader and means the same function there; what the other side cannot hold is refused, never written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance import adapters as converter
from foundation.dtypes import FLOAT32
from foundation.model_cases import LoraSettings, ModelCase
from foundation.model_files import mlx_directory, mlx_lm_adapter_directory, reference_directory
from reference import models as reference
from subjects import models as subject


def _case(kind: str = "lora", keys: tuple[str, ...] | None = ("self_attn.q_proj", "mlp.down_proj")) -> ModelCase:
    lora = LoraSettings(fine_tune_type=kind, num_layers=2, rank=2, scale=3.0, keys=keys)
    return ModelCase(
        "llama", FLOAT32, layers=3, heads=2, kv_heads=1, head_dim=4, intermediate=6, vocab=16, tied=False,
        lora=lora, batch=1, length=4, seed=5, adapter_scale=0.1, experts=0, experts_per_token=0,
    )  # fmt: skip


def _reference_logits(case: ModelCase) -> np.ndarray:
    with reference.borrowed(case, torch.float32) as model:
        return reference.logits(model, case)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_mlx_lm_adapter_as_peft_s_loads_with_peft_s_from_pretrained_and_gives_peft_s_logits(kind, tmp_path):
    from peft import PeftModel

    case = _case(kind)
    assert converter.main(["to-peft", str(mlx_lm_adapter_directory(case)), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (2, 6.0, kind == "dora")
    assert (sorted(config["target_modules"]), config["layers_to_transform"]) == (
        ["mlp.down_proj", "self_attn.q_proj"],
        [1, 2],
    )
    base = reference.loaded(reference_directory(case), torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    np.testing.assert_array_equal(reference.logits(model, case), _reference_logits(case))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_peft_adapter_as_mlx_lm_s_loads_with_load_adapters_and_gives_mlx_lm_s_logits(kind, tmp_path):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    case = _case(kind)
    with reference.borrowed(case, torch.float32) as model:
        model.save_pretrained(str(tmp_path / "peft"))
    arguments = ["to-mlx", str(tmp_path / "peft"), str(tmp_path / "mlx"), "--model", str(reference_directory(case))]
    assert converter.main(arguments) == 0
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj"]
    assert config["fine_tune_type"] == kind and config["lora_parameters"]["scale"] == 3.0
    model, _ = load_model(mlx_directory(case))
    load_adapters(model, str(tmp_path / "mlx"))
    np.testing.assert_array_equal(
        subject.logits(model.eval(), case), subject.logits(subject.MlxLmEntryPoints().adapted(case), case)
    )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_vlm_s_own_file_as_peft_s_and_peft_s_as_mlx_vlm_s_give_the_same_logits(kind, tmp_path):
    from mlx_vlm.trainer import load_adapters
    from mlx_vlm.utils import load_model
    from peft import PeftModel

    case, vlm = _case(kind), subject.MlxVlmEntryPoints()
    assert converter.main(["to-peft", str(vlm.adapter_directory(case)), str(tmp_path / "peft")]) == 0
    base = reference.loaded(reference_directory(case), torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    np.testing.assert_array_equal(reference.logits(model, case), _reference_logits(case))
    assert converter.main(["to-mlx", str(tmp_path / "peft"), str(tmp_path / "mlx"), "--for", "mlx-vlm"]) == 0
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert "language_model.model.layers.2.mlp.down_proj" in config["lora_parameters"]["keys"]
    loaded = load_model(mlx_directory(case))
    load_adapters(loaded, str(tmp_path / "mlx"))
    np.testing.assert_array_equal(subject.logits(loaded.eval(), case), subject.logits(vlm.adapted(case), case))


def test_mlx_lm_s_adapters_are_those_its_training_saves_value_for_value():
    case = _case("dora")
    written, saved = mlx_lm_adapter_directory(case), subject.MlxLmEntryPoints().adapter_directory(case)
    assert written != saved
    before, after = load_file(str(written / "adapters.safetensors")), load_file(str(saved / "adapters.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[name], after[name]) for name in before)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config == json.loads((written / "adapter_config.json").read_text())


def test_a_round_trip_gives_back_mlx_lm_s_file_value_for_value(tmp_path):
    case = _case("dora", keys=None)
    source = mlx_lm_adapter_directory(case)
    assert converter.main(["to-peft", str(source), str(tmp_path / "peft")]) == 0
    back = ["to-mlx", str(tmp_path / "peft"), str(tmp_path / "back"), "--model", str(reference_directory(case))]
    assert converter.main(back) == 0
    before, after = (
        load_file(str(source / "adapters.safetensors")),
        load_file(str(tmp_path / "back" / "adapters.safetensors")),
    )
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    original = json.loads((source / "adapter_config.json").read_text())
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back["num_layers"] == original["num_layers"] and back["fine_tune_type"] == "dora"
    assert back["lora_parameters"]["scale"] == original["lora_parameters"]["scale"]  # alpha = 3 * 2, read back / 2


def test_rslora_s_scale_is_alpha_over_the_root_of_r(tmp_path):
    case = _case()
    with reference.borrowed(case, torch.float32) as model:
        model.save_pretrained(str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True}))
    assert converter.read_peft(tmp_path / "peft").scale == 6.0 / math.sqrt(2)


def _broken_mlx_lm(tmp_path, change) -> str:
    """mlx-lm's adapter directory of a case with its weights changed by `change` (a dict to change in place)."""
    source = mlx_lm_adapter_directory(_case())
    weights = load_file(str(source / "adapters.safetensors"))
    change(weights)
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(weights, str(broken / "adapters.safetensors"))
    (broken / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return str(broken)


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda w: w.update({k: w[k].T.contiguous() for k in w if k.endswith("lora_a")}), "configuration's rank is 2"),
        (lambda w: w.pop("model.layers.2.mlp.down_proj.lora_b"), "lora_a without lora_b"),
        (lambda w: w.pop("model.layers.2.mlp.down_proj.lora_a"), "a B factor or a magnitude without its A factor"),
        (lambda w: w.update({"model.layers.2.self_attn.q_proj.lora_c": torch.zeros(2)}), "not an adapter parameter"),
        (
            lambda w: w.update({"lm_head.lora_a": torch.zeros(8, 2), "lm_head.lora_b": torch.zeros(2, 16)}),
            "outside the model's blocks",
        ),
        (lambda w: w.update({"model.layers.2.mlp.down_proj.m": torch.ones(8)}), "a magnitude in a LoRA adapter"),
        (lambda w: w.update({"model.layers.2.mlp.down_proj.lora_a": torch.zeros(3, 2, 6)}), "layer of experts"),
        (
            lambda w: w.update({f"language_model.{k.removeprefix('model.')}": w.pop(k) for k in list(w)}),
            "a vision-language model's language part",
        ),
    ],
    ids=[
        "transposed",
        "half an adapter",
        "the other half",
        "unknown key",
        "outside the blocks",
        "stray magnitude",
        "experts",
        "a vision-language model's",
    ],
)
def test_a_broken_or_unconvertible_mlx_lm_file_is_refused_with_its_reason_and_nothing_written(
    change, said, tmp_path, capsys
):
    out = tmp_path / "out"
    assert converter.main(["to-peft", _broken_mlx_lm(tmp_path, change), str(out)]) == 1
    assert said in capsys.readouterr().err and not out.exists()


def test_what_mlx_lm_cannot_say_is_refused(tmp_path):
    case = _case()
    with reference.borrowed(case, torch.float32) as model:
        model.save_pretrained(str(tmp_path / "peft"))
    weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    del weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    del weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(weights, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(converter.NotConvertible, match="same keys in every adapted block"):
        converter.write_mlx_lm(converter.read_peft(tmp_path / "peft"), tmp_path / "mlx", 3)
    with pytest.raises(converter.NotConvertible, match="last num_layers blocks of the model's 4"):
        converter.write_mlx_lm(converter.read_mlx(mlx_lm_adapter_directory(case)), tmp_path / "mlx", 4)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 4}}))
    with pytest.raises(converter.NotConvertible, match="one rank and one scale"):
        converter.read_peft(tmp_path / "peft")
    assert not (tmp_path / "mlx").exists()


def test_the_command_line_says_what_is_wrong_with_its_arguments(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("")
    for arguments, said in [
        (["to-peft", str(tmp_path), str(occupied)], "not an empty directory"),
        (["to-mlx", str(tmp_path), str(tmp_path / "x")], "--model"),
    ]:
        with pytest.raises(SystemExit) as exited:
            converter.main(arguments)
        assert exited.value.code == 2 and said in capsys.readouterr().err
    assert converter.main(["to-peft", str(tmp_path), str(tmp_path / "y")]) == 1
    assert "adapter_config.json: no such file" in capsys.readouterr().err
    unwritable = occupied / "file" / "out"  # a directory under a file
    assert converter.main(["to-peft", str(mlx_lm_adapter_directory(_case())), str(unwritable)]) == 1
    assert f"could not write {unwritable}" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"rank": 8, "alpha": 16, "dropout": 0.0}))
    found = subprocess.run(
        [sys.executable, "-m", "conformance.adapters", "to-peft", str(tmp_path), str(tmp_path / "y")],
        capture_output=True,
        text=True,
    )
    said = "mlx-vlm's older schema (rank, alpha), whose scale depends on the release"
    assert found.returncode == 1 and said in found.stderr


def test_neither_mlx_package_loads_the_other_s_file_and_the_way_between_them_is_peft_s_format(tmp_path):
    """What the README's round-trip table says of the two MLX packages: each refuses the other's file, and
    ``to-peft`` then ``to-mlx`` carries it across."""
    case, lm, vlm = _case(), subject.MlxLmEntryPoints(), subject.MlxVlmEntryPoints()
    with pytest.raises(AttributeError, match="has no attribute 'self_attn'"):
        vlm.adapted(case, lm.adapter_directory(case))
    with pytest.raises(ValueError, match="not an adapter parameter in the model"):
        lm.adapted(case, vlm.adapter_directory(case))
    assert converter.main(["to-peft", str(lm.adapter_directory(case)), str(tmp_path / "peft")]) == 0
    assert converter.main(["to-mlx", str(tmp_path / "peft"), str(tmp_path / "vlm"), "--for", "mlx-vlm"]) == 0
    np.testing.assert_array_equal(
        subject.logits(vlm.adapted(case, tmp_path / "vlm"), case), subject.logits(vlm.adapted(case), case)
    )


def _mixture(keys: tuple[str, ...] | None = None) -> ModelCase:
    lora = LoraSettings(fine_tune_type="lora", num_layers=2, rank=2, scale=2.0, keys=keys)
    return ModelCase(
        "qwen3_moe", FLOAT32, layers=3, heads=2, kv_heads=1, head_dim=4, intermediate=6, vocab=16, tied=False,
        lora=lora, batch=1, length=4, seed=3, adapter_scale=0.1, experts=3, experts_per_token=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    "keys",
    [None, ("mlp.switch_mlp.up_proj",), ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.down_proj"), ("mlp.gate",)],
    ids=["every layer", "up only", "gate and down", "router"],
)
def test_a_mixture_s_experts_and_router_cross_both_ways_bit_for_bit(keys, tmp_path):
    """mlx-lm's layers of experts are transformers' fused parameters in peft (``target_parameters``, the gate and up
    projections' adapters one of rank 2r, ``rank_pattern``), and come back as they were."""
    case, lm = _mixture(keys), subject.MlxLmEntryPoints()
    assert converter.main(["to-peft", str(lm.adapter_directory(case)), str(tmp_path / "peft")]) == 0
    np.testing.assert_array_equal(
        reference.logits(reference.with_saved_adapters(case, tmp_path / "peft"), case), _reference_logits(case)
    )
    back = ["to-mlx", str(reference.saved_adapters(case)), str(tmp_path / "mlx"), "--model", str(mlx_directory(case))]
    assert converter.main(back) == 0
    before = load_file(str(lm.adapter_directory(case) / "adapters.safetensors"))
    after = load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[name], after[name]) for name in before)
    np.testing.assert_array_equal(
        subject.logits(lm.adapted(case, tmp_path / "mlx"), case), subject.logits(lm.adapted(case), case)
    )


def test_a_fused_adapter_peft_trained_whole_is_refused_where_mlx_lm_s_separate_layers_cannot_hold_it(tmp_path):
    case = _mixture(("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj"))
    source = reference.saved_adapters(case)
    weights = load_file(str(source / "adapter_model.safetensors"))
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    name = "base_model.model.model.layers.2.mlp.experts.lora_B.weight"
    weights[name] = weights[name] + 1e-3  # B's blocks off the diagonal no longer zero, as whole training leaves them
    save_file(weights, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(converter.NotConvertible, match="B mixes the ranks of mlp.switch_mlp.gate_proj and"):
        converter.write_mlx_lm(converter.read_peft(tmp_path / "peft"), tmp_path / "mlx", 3)
    config = json.loads((source / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"gate_up_proj": 3}}))
    with pytest.raises(converter.NotConvertible, match="rank 3 and alpha"):
        converter.read_peft(tmp_path / "peft")


def test_mlx_lm_s_old_expert_layout_reads_as_the_new_one(tmp_path):
    """mlx-lm 0.28.2 and before kept a layer of experts' A as (r·experts, in), expert e's ranks at rows e·r...: the
    same adapters, converted to the same peft file."""
    case, lm = _mixture(), subject.MlxLmEntryPoints()
    new = lm.adapter_directory(case)
    weights = load_file(str(new / "adapters.safetensors"))
    old = {
        name: w.reshape(-1, w.shape[-1]) if ".switch_mlp." in name and name.endswith("lora_a") else w
        for name, w in weights.items()
    }
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "adapters.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text((new / "adapter_config.json").read_text())
    for source, out in ((new, "from new"), (tmp_path / "old", "from old")):
        assert converter.main(["to-peft", str(source), str(tmp_path / out)]) == 0
    first, second = (load_file(str(tmp_path / out / "adapter_model.safetensors")) for out in ("from new", "from old"))
    assert set(first) == set(second) and all(torch.equal(first[name], second[name]) for name in first)
