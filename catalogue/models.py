"""Wrong ways to move adapters into a whole model: each changes one step of `MlxLmEntryPoints` (or of
`MlxVlmEntryPoints`), as an exporter, a converter or a loader with that bug would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from foundation import memo
from foundation.model_cases import DENSE_ARCHITECTURES, VISION_LANGUAGE_ARCHITECTURES, ModelCase
from foundation.model_files import (
    mlx_directory,
    mlx_lm_adapter_directory,
    mlx_lm_adapters,
    mlx_lm_layout,
    reference_directory,
    write_mlx_lm_adapters,
)
from subjects.models import MlxLmEntryPoints, MlxVlmEntryPoints


class _WritesItsOwnAdapters(MlxLmEntryPoints):
    """Writes the case's adapter directory through `changed` (per case, once)."""

    def adapter_directory(self, case: ModelCase) -> Path:
        return memo.once(case, ("adapters", type(self).__name__), lambda: write_mlx_lm_adapters(*self._changed(case)))

    def _changed(self, case: ModelCase) -> tuple[dict, dict]:
        weights, config = mlx_lm_adapters(case)
        return self.changed(case, weights, config)

    def changed(self, case: ModelCase, weights: dict[str, np.ndarray], config: dict) -> tuple[dict, dict]:
        raise NotImplementedError


class ScaleTimesRank(_WritesItsOwnAdapters):
    """Writes peft's ``lora_alpha`` (scale * r) where mlx-lm's ``scale`` belongs."""

    def changed(self, case, weights, config):
        parameters = {**config["lora_parameters"], "scale": case.lora.scale * case.lora.rank}
        return weights, {**config, "lora_parameters": parameters}


class OneLayerWithoutAdapter(_WritesItsOwnAdapters):
    """Leaves the first adapted layer's weights out of the file: mlx-lm loads adapters with ``strict=False``, so
    that layer keeps its fresh adapter (B = 0) and adds nothing."""

    def changed(self, case, weights, config):
        first = min(case.adapters)
        return {name: w for name, w in weights.items() if not name.startswith(f"{first}.")}, config


class TransposedOnSquareLayers(_WritesItsOwnAdapters):
    """Writes the update transposed, ``(B A)^T``, where the layer is square and the file's shapes still agree."""

    def changed(self, case, weights, config):
        for path, (a, b) in case.adapters.items():
            if a.shape[-1] == b.shape[-2]:  # (B A)^T = A^T B^T, for each expert of a layer of experts
                transposed = np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)
                weights[f"{path}.lora_a"], weights[f"{path}.lora_b"] = mlx_lm_layout(*transposed)
        return weights, config


class MagnitudesLeftOut(_WritesItsOwnAdapters):
    """Leaves DoRA's magnitudes ``m`` out of the file: mlx-lm loads with ``strict=False``, so each layer keeps the
    row norms of its base weight that it starts from."""

    def changed(self, case, weights, config):
        return {name: w for name, w in weights.items() if not name.endswith(".m")}, config


class NumLayersOffByOne(_WritesItsOwnAdapters):
    """Counts one block too many in ``num_layers``: mlx-lm adapts it too (with a fresh adapter, so the logits stay)."""

    def changed(self, case, weights, config):
        return weights, {**config, "num_layers": config["num_layers"] + 1}


class SavesFactorsInPeftsLayout(MlxLmEntryPoints):
    """Saves each factor in peft's layout (A (r, in), B (out, r)) and loads them transposed back: its own round trip
    gives the function, but the file means nothing, or something else, to anyone else's loader."""

    def adapter_directory(self, case: ModelCase) -> Path:
        def saved() -> Path:
            weights, config = mlx_lm_adapters(case)
            for name in [name for name in weights if name.endswith(("lora_a", "lora_b"))]:
                weights[name] = np.ascontiguousarray(np.swapaxes(weights[name], -1, -2))
            return write_mlx_lm_adapters(weights, config)

        return memo.once(case, ("adapters", type(self).__name__), saved)

    def adapted(self, case: ModelCase, directory: Path | None = None):
        return super().adapted(case, directory or mlx_lm_adapter_directory(case))  # its loader transposes back


class ReadsScaleAsAlpha(MlxLmEntryPoints):
    """Its loader takes a file's ``scale`` for peft's ``lora_alpha`` and divides it by the rank (the same where
    r = 1)."""

    def adapted(self, case: ModelCase, directory: Path | None = None):
        weights, config = mlx_lm_adapters(case) if directory is None else _read_mlx_lm_files(directory)
        parameters = config["lora_parameters"]
        misread = {**config, "lora_parameters": {**parameters, "scale": parameters["scale"] / parameters["rank"]}}
        return super().adapted(case, write_mlx_lm_adapters(weights, misread))


def _read_mlx_lm_files(directory: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.torch import load_file

    weights = {name: w.float().numpy() for name, w in load_file(str(directory / "adapters.safetensors")).items()}
    return weights, json.loads((directory / "adapter_config.json").read_text())


class TrainsTheBase(MlxLmEntryPoints):
    """Prepares the model for training without freezing it first: the base's weights train with the adapters."""

    def trainable(self, case: ModelCase):
        return super().trainable(case).unfreeze()


class DefaultAdam(MlxLmEntryPoints):
    """Trains with MLX's Adam as it comes, mlx-lm's default (``optimizer: adam``, no ``optimizer_config``): its moments
    are not bias-corrected, so its first step is ``sqrt(1 - b2) / (1 - b1)`` = 0.316 / 0.1, 3.16 times torch's."""

    def optimizer(self, name: str, learning_rate: float):
        import mlx.optimizers as optim

        return optim.Adam(learning_rate=learning_rate) if name == "adam" else super().optimizer(name, learning_rate)


class FuseDropsAdapters(MlxLmEntryPoints):
    """Saves the base model as the fused one: a fuse that forgets to merge the adapters."""

    def fused_directory(self, case: ModelCase, dequantize: bool = False) -> Path:
        return reference_directory(case) if dequantize else mlx_directory(case)


class AlphaIsScale(MlxVlmEntryPoints):
    """Passes mlx-lm's ``scale`` as mlx-vlm's ``alpha``, which mlx-vlm divides by the rank: the term is r times too
    small (the same where r = 1). Drawn on the models mlx-vlm adapts (it refuses a mixture's experts, a known
    divergence of its own)."""

    architectures = DENSE_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES

    def alpha(self, case: ModelCase) -> float:
        return case.lora.scale
