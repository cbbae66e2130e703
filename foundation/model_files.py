"""A whole-model case as the files its users move around: the model as transformers saves it, and the adapters as
mlx-lm saves them. Both sides load these through their own loading paths, so a key or layout mapping bug shows.

The files live in one scratch directory per process, removed when it exits.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

from foundation.memo import once_per_case
from foundation.model_cases import ModelCase

_SCRATCH = tempfile.TemporaryDirectory(prefix="conformance-models-")


def _new_directory(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH.name))


@once_per_case
def model_directory(case: ModelCase) -> Path:
    """The case's model as transformers saves it (``config.json``, ``model.safetensors``) in the case's dtype,
    initialised by transformers from the case's seed."""
    directory = _new_directory("model-")
    config = transformers.AutoConfig.for_model(**case.hf_config())
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(case.dtype.torch).save_pretrained(directory)
    return directory


@once_per_case
def mlx_lm_adapter_directory(case: ModelCase) -> Path:
    """The case's adapters as mlx-lm saves them: ``adapters.safetensors`` (``lora_a`` (in, r) and ``lora_b``
    (r, out) per adapted layer) and ``adapter_config.json``."""
    directory = _new_directory("mlx-lm-adapters-")
    weights = {}
    for path, (a, b) in case.adapters.items():
        weights[f"{path}.lora_a"] = np.ascontiguousarray(a.T)
        weights[f"{path}.lora_b"] = np.ascontiguousarray(b.T)
    save_file(weights, str(directory / "adapters.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(case.lora.adapter_config()))
    return directory
