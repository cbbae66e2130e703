"""Whole models (the first part of the models family): a tiny model saved by transformers is what both sides load,
and mlx-lm's adapter configuration, bridged to peft's, adapts the same modules on both."""

import dataclasses

from hypothesis import HealthCheck, given, settings

from foundation.dtypes import FLOAT32
from foundation.model_cases import LINEAR_KEYS, LoraSettings, ModelCase, model_cases
from reference import models as reference
from subjects import models as subject
from subjects.config_bridge import peft_config


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(model_cases())
def test_mlx_lm_adapts_the_modules_peft_adapts_for_the_same_configuration(case):
    adapted = subject.adapted_modules(subject.MlxLmEntryPoints().adapted(case))
    assert adapted == reference.adapted_modules(reference.adapted(case, FLOAT32.torch))
    expected = {f"model.layers.{layer}.{key}" for layer in case.adapted_layers for key in case.lora.adapted_keys}
    assert adapted == expected == set(case.adapters)


def test_mlx_lm_s_scale_is_peft_s_alpha_over_r_and_its_last_layers_are_peft_s_layers_to_transform():
    config = peft_config(LoraSettings("lora", num_layers=2, rank=4, scale=20.0, keys=("self_attn.q_proj",)), layers=5)
    assert config.lora_alpha / config.r == 20.0
    assert config.layers_to_transform == [3, 4] and set(config.target_modules) == {"self_attn.q_proj"}
    everything = peft_config(LoraSettings("lora", num_layers=9, rank=1, scale=1.0, keys=None), layers=3)
    assert everything.layers_to_transform == [0, 1, 2] and set(everything.target_modules) == set(LINEAR_KEYS)


@given(model_cases())
def test_a_model_case_is_rebuilt_from_its_description(case):
    rebuilt = ModelCase.from_description(case.describe())
    assert all(getattr(rebuilt, f.name) == getattr(case, f.name) for f in dataclasses.fields(ModelCase))


def test_a_check_whose_entry_point_a_package_lacks_is_not_provided_for_its_subject():
    """mlx-vlm has no fuse command and no mlx-lm training path: the suite skips those checks for it, with the reason,
    and the studies and replay leave them out."""
    from conformance.families import MODEL
    from subjects.known import BY_NAME

    checks = MODEL.checks_on("float")
    vlm, lm = BY_NAME["mlx_vlm.get_peft_model"], BY_NAME["mlx_lm.load_adapters"]
    assert {name for name, check in checks.items() if check.not_provided_reason(vlm)} == {
        "steps_sgd",
        "fuse",
        "fused_in_transformers",
    }
    assert "mlx-vlm has no fused entry point" in checks["fuse"].not_provided_reason(vlm)
    assert not any(check.not_provided_reason(lm) for check in checks.values())
