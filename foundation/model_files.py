"""A whole-model case as the files its users move around: the model as transformers saves it (with a tokenizer over
the case's vocabulary, which mlx-lm's ``load`` and ``fuse`` need), and the adapters as mlx-lm saves them. Both sides
load these through their own loading paths, so a key or layout mapping bug shows.

The files live in one scratch directory per process, removed when it exits. transformers is imported where a model is
built: the catalogue of subjects (`subjects.known`) loads this module without it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from foundation.memo import once_per_case
from foundation.model_cases import VISION_LANGUAGE_ARCHITECTURES, ModelCase
from foundation.quantization import Parts, dequantize, quantize, quantize_base, to_mlx

_SCRATCH = tempfile.TemporaryDirectory(prefix="conformance-models-")


def new_directory(prefix: str) -> Path:
    """A new directory in this process's scratch directory."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH.name))


def _tokenizer(vocab: int):
    """A word-level tokenizer whose tokens ``t0``, ``t1``... are the ids 0, 1...: what a model directory holds."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t0", eos_token="t1")


@once_per_case
def model_directory(case: ModelCase) -> Path:
    """The case's model as transformers saves it (``config.json``, ``model.safetensors``, the tokenizer's files) in
    the case's dtype, initialised by transformers from the case's seed."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for every case
    directory = new_directory("model-")
    config = transformers.AutoConfig.for_model(**case.hf_config())
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        model = auto_class(case.architecture).from_config(config, dtype=torch.float32)
    model.to(case.dtype.torch).save_pretrained(directory)
    _tokenizer(case.vocab).save_pretrained(directory)
    if not case.rope_parameters_only:
        saved = json.loads((directory / "config.json").read_text())
        if case.vision_language:
            saved["text_config"] |= transformers_4_keys(case)
        else:
            saved |= transformers_4_keys(case)
        (directory / "config.json").write_text(json.dumps(saved, indent=2))
    return directory


def auto_class(architecture: str):
    """transformers' class that builds and loads a model of `architecture` with its output layer."""
    import transformers

    if architecture in VISION_LANGUAGE_ARCHITECTURES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


@once_per_case
def _saved_weights(case: ModelCase) -> dict:
    """The weights transformers saved for the case, by name (torch tensors; not to be changed in place)."""
    from safetensors.torch import load_file

    return load_file(model_directory(case) / "model.safetensors")


@once_per_case
def _quantized(case: ModelCase) -> dict[str, tuple[Parts, np.ndarray]]:
    """Per weight of the saved model that MLX's copy quantizes (every matrix, of a linear layer or an embedding, whose
    rows the group size divides, as ``mlx_lm.convert -q`` does): its quantized parts and the values they hold."""
    quantization = case.quantization
    found = {}
    for name, tensor in sorted(_saved_weights(case).items()):
        if name.endswith(".weight") and tensor.ndim == 2 and tensor.shape[-1] % quantization.group_size == 0:
            found[name] = quantize_base(tensor.double().numpy(), case.dtype, quantization)
    return found


@once_per_case
def _mlx_quantized_directory(case: ModelCase) -> Path:
    """The model as ``mlx_lm.convert -q`` saves it: the quantized weights packed, with their ``scales`` (and
    ``biases``), the rest in the model's dtype, and ``quantization`` in ``config.json``."""
    import mlx.core as mx

    directory = new_directory("mlx-quantized-")
    quantized = _quantized(case)
    weights = {}
    for name, tensor in _saved_weights(case).items():
        if name in quantized:
            parts = to_mlx(quantized[name][0], case.dtype)
            stem = name.removesuffix(".weight")
            weights |= dict(zip((name, f"{stem}.scales", f"{stem}.biases"), parts, strict=False))
        else:
            weights[name] = mx.array(tensor.double().numpy()).astype(getattr(mx, case.dtype.name))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((model_directory(case) / "config.json").read_text())
    described = case.quantization.describe()
    (directory / "config.json").write_text(
        json.dumps(config | {"quantization": described, "quantization_config": described})
    )
    _copy_tokenizer(model_directory(case), directory)
    return directory


@once_per_case
def _dequantized_directory(case: ModelCase) -> Path:
    """The saved model with each weight MLX's copy quantizes replaced by the values its parts hold: the function the
    quantized model computes, as transformers loads it."""
    import torch
    from safetensors.torch import save_file

    directory = new_directory("dequantized-")
    saved = dict(_saved_weights(case))
    for name, (_, values) in _quantized(case).items():
        saved[name] = torch.from_numpy(values).to(case.dtype.torch)
    save_file(saved, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(model_directory(case) / "config.json", directory / "config.json")
    _copy_tokenizer(model_directory(case), directory)
    return directory


def _copy_tokenizer(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(path, target / path.name)


def mlx_directory(case: ModelCase) -> Path:
    """The model directory the MLX side loads: as transformers saved it, or quantized as mlx-lm's ``convert -q``
    saves it."""
    return model_directory(case) if case.quantization is None else _mlx_quantized_directory(case)


def reference_directory(case: ModelCase) -> Path:
    """The model directory transformers and peft load: as transformers saved it, or with the values MLX's quantized
    copy holds."""
    return model_directory(case) if case.quantization is None else _dequantized_directory(case)


def mlx_weights(directory: Path) -> dict:
    """The arrays of an MLX model directory (``model*.safetensors``), by name."""
    import mlx.core as mx

    found = {}
    for path in sorted(directory.glob("model*.safetensors")):
        found |= mx.load(str(path))
    return found


def quantized_layers(weights: dict, case: ModelCase) -> dict[str, np.ndarray]:
    """The values each quantized layer of an MLX model's `weights` holds (in the case's quantization and dtype), by the
    layer's path, float64."""
    import mlx.core as mx

    found = {}
    for name in sorted(weights):
        if name.endswith(".scales"):
            stem = name.removesuffix(".scales")
            parts = tuple(
                weights[f"{stem}.{part}"] for part in ("weight", "scales", "biases") if f"{stem}.{part}" in weights
            )
            values = dequantize(parts, case.quantization, getattr(mx, case.dtype.name)).astype(mx.float32)
            found[stem] = np.array(values, dtype=np.float64)
    return found


def requantized(weight, case: ModelCase) -> np.ndarray:
    """The values an MLX weight holds once quantized, as it is, in the case's quantization (and dequantized to the
    case's dtype, as the quantized layer computes)."""
    import mlx.core as mx

    dtype = getattr(mx, case.dtype.name)
    values = dequantize(quantize(weight, case.quantization), case.quantization, dtype)
    return np.array(values.astype(mx.float32), dtype=np.float64)


def transformers_4_keys(case: ModelCase) -> dict:
    """What transformers 4 wrote to ``config.json`` (and most published checkpoints hold) that transformers 5 writes
    otherwise: the rotary base at the top level (5: under ``rope_parameters`` only) and a mixture's ``num_experts``
    (5: ``num_local_experts``)."""
    return {"rope_theta": case.rope_theta} | ({"num_experts": case.experts} if case.mixture else {})


def mlx_lm_adapters(case: ModelCase) -> tuple[dict[str, np.ndarray], dict]:
    """The case's adapters as mlx-lm saves them: the weights of ``adapters.safetensors`` (``lora_a`` (in, r) and
    ``lora_b`` (r, out) per adapted linear layer; per layer of experts, ``lora_a`` (experts, r, in) and ``lora_b``
    (experts, out, r)) and ``adapter_config.json``."""
    weights = {}
    for path, (a, b) in case.adapters.items():
        weights[f"{path}.lora_a"], weights[f"{path}.lora_b"] = mlx_lm_layout(a, b)
    weights |= {f"{path}.m": m for path, m in dora_magnitudes(case).items()}
    return weights, case.lora.adapter_config()


@once_per_case
def dora_magnitudes(case: ModelCase) -> dict[str, np.ndarray]:
    """DoRA's magnitude m (out,) per adapted layer, float32: the row norms of the adapted weight ``W + scale B A`` (W as
    the reference loads it), each times a factor drawn within [0.5, 1.5] from the case's seed, as training moves m
    away from the norms it starts at. None for LoRA."""
    if not case.dora:
        return {}
    from safetensors.torch import load_file

    saved = load_file(reference_directory(case) / "model.safetensors")
    rng = np.random.default_rng(case.seed + 2)
    found = {}
    for path, (a, b) in sorted(case.adapters.items()):
        weight = saved[case.reference_name(f"{path}.weight")].double().numpy()
        adapted = weight + case.lora.scale * (b.astype(np.float64) @ a.astype(np.float64))
        norms = np.linalg.norm(adapted, axis=1)
        found[path] = (norms * rng.uniform(0.5, 1.5, norms.shape)).astype(np.float32)
    return found


def mlx_lm_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mlx-lm's ``lora_a`` and ``lora_b`` of the adapter whose A and B are in peft's layouts (`ModelCase.adapters`):
    a linear layer's transposed, a layer of experts' as they are."""
    if a.ndim == 3:
        return a, b
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def write_mlx_lm_adapters(weights: dict[str, np.ndarray], config: dict) -> Path:
    """A new adapter directory of mlx-lm's format holding `weights` and `config`."""
    directory = new_directory("mlx-lm-adapters-")
    save_file(weights, str(directory / "adapters.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@once_per_case
def mlx_lm_adapter_directory(case: ModelCase) -> Path:
    """The case's adapters in a directory as mlx-lm saves them (`mlx_lm_adapters`)."""
    return write_mlx_lm_adapters(*mlx_lm_adapters(case))
