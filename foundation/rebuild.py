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
from foundation.dtypes import BY_NAME
from foundation.quantization import Quantization
from foundation.switch_cases import SwitchCase, make_switch_case


def case_from_description(description: dict) -> LinearCase | EmbeddingCase | SwitchCase:
    """Rebuild a case from its ``describe()``."""
    d = description
    if d.get("kind") == "embedding":
        shared = {k: d[k] for k in SHARED_PARAMETERS if k != "dtype"}
        shared.update(batch_shape=tuple(d["batch_shape"]), magnitudes=tuple(d["magnitudes"]))
        quantization = Quantization(**d["quantization"]) if d.get("quantization") else None
        return make_embedding_case(
            d["num_embeddings"], d["dims"], dtype=BY_NAME[d["dtype"]], quantization=quantization, **shared
        )
    parameters = LinearParameters.from_description(d).parameters()
    if d.get("kind") == "switch":
        del parameters["use_dora"], parameters["fan_in_fan_out"]
        return make_switch_case(d["num_experts"], d["top_k"], d["sorted_indices"], **parameters)
    return make_linear_case(**parameters)
