"""A case rebuilt from its ``describe()``: what replay, the reproduction scripts and the studies start from."""

from __future__ import annotations

from foundation.cases import (
    SHARED_PARAMETERS,
    EmbeddingCase,
    LinearCase,
    LinearParameters,
    make_embedding_case,
    make_linear_case,
)
from foundation.model_cases import ModelCase
from foundation.switch_cases import SwitchCase, make_switch_case


def case_from_description(description: dict) -> LinearCase | EmbeddingCase | SwitchCase | ModelCase:
    """Rebuild a case from its ``describe()``."""
    d = description
    if d.get("kind") == "model":
        return ModelCase.from_description(d)
    if d.get("kind") == "embedding":
        as_linear = {**d, "in_features": d["num_embeddings"], "out_features": d["dims"], "bias": False}
        lookup = LinearParameters.from_description(as_linear)
        shared = {k: getattr(lookup, k) for k in SHARED_PARAMETERS}
        return make_embedding_case(d["num_embeddings"], d["dims"], quantization=lookup.quantization, **shared)
    parameters = LinearParameters.from_description(d).parameters()
    if d.get("kind") == "switch":
        del parameters["use_dora"], parameters["fan_in_fan_out"]
        return make_switch_case(d["num_experts"], d["top_k"], d["sorted_indices"], **parameters)
    return make_linear_case(**parameters)
