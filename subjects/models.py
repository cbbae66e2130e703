"""The subject side of a whole model: mlx-lm's own entry points, as its users call them.

mlx-lm loads the directory transformers saved (`mlx_lm.utils.load_model`, which applies the architecture's
``sanitize``) and the adapters from a directory in mlx-lm's own format (``adapters.safetensors`` and
``adapter_config.json``) with `mlx_lm.tuner.utils.load_adapters`, which builds the LoRA layers
(`linear_to_lora_layers`) from that configuration, as ``mlx_lm.generate --adapter-path`` does; it fuses them with
its ``fuse`` command (`mlx_lm.fuse.main`), which saves a model directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from foundation import memo
from foundation.model_cases import ARCHITECTURES, MLX_VLM_ROOT, TEXT_ARCHITECTURES, ModelCase
from foundation.model_files import mlx_directory, mlx_lm_adapter_directory, mlx_lm_adapters, new_directory


class MlxLmEntryPoints:
    """How a user of mlx-lm adapts, runs and fuses a model: the convention of a model subject. A wrong variant
    (`catalogue.models`) changes one of these steps."""

    roles: Mapping[str, str] = MappingProxyType({})
    """A model subject has no layer of its own whose parameters play peft's roles."""
    architectures: tuple[str, ...] = TEXT_ARCHITECTURES
    """The architectures its loader builds (mlx-lm: text models only)."""

    adapter_schema = "mlx-lm"
    """The adapter files its loader reads: what `conformance.adapters` writes for it."""

    def adapter_directory(self, case: ModelCase) -> Path:
        """The case's adapters as mlx-lm's training saves them: the model ``mlx_lm.lora`` prepares from them
        (`prepared_for_training`, from the case's adapters written in mlx-lm's format), its trainable parameters saved
        as its trainer saves them (``mx.save_safetensors``), beside the configuration ``mlx_lm.lora`` writes
        (``save_config``)."""
        return memo.once(case, "mlx-lm saved adapters", lambda: _saved_by_mlx_lm(case))

    def adapted(self, case: ModelCase, directory: Path | None = None) -> nn.Module:
        """mlx-lm's model of the case's directory, with the adapters of `directory` (the case's, `adapter_directory`)
        loaded by mlx-lm's ``load_adapters``, in eval mode."""
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import load_model

        model, _ = load_model(mlx_directory(case))
        load_adapters(model, str(directory or self.adapter_directory(case)))
        return model.eval()

    def trainable(self, case: ModelCase) -> nn.Module:
        """The model as ``mlx_lm.lora`` prepares it for training (`prepared_for_training`), in training mode."""
        return prepared_for_training(case, self.adapter_directory(case)).train()

    def optimizer(self, name: str, learning_rate: float):
        """The MLX optimizer ``mlx_lm.lora`` builds for ``optimizer: name`` with this `optimizer_config`: SGD as it is;
        Adam with ``{"adam": {"bias_correction": true}}``, torch's Adam (MLX's own default leaves the moments
        uncorrected: `catalogue.models.DefaultAdam`)."""
        import mlx.optimizers as optim

        if name == "adam":
            return optim.Adam(learning_rate=learning_rate, bias_correction=True)
        return optim.SGD(learning_rate=learning_rate)

    def trained(
        self, case: ModelCase, steps: int, learning_rate: float, optimizer: str = "sgd"
    ) -> tuple[list[float], dict[str, np.ndarray]]:
        """`steps` steps of the MLX `optimizer` (``sgd`` or ``adam``) on mlx-lm's `default_loss` over the case's
        tokens, the model prepared as ``mlx_lm.lora`` prepares it (`trainable`). The losses, and the trainable
        parameters after the steps."""
        from mlx_lm.tuner.trainer import default_loss

        model = self.trainable(case)
        mlx_optimizer = self.optimizer(optimizer, learning_rate)
        loss_and_grad = nn.value_and_grad(model, lambda model, batch, lengths: default_loss(model, batch, lengths)[0])
        batch = mx.array(case.tokens)
        lengths = mx.array([[0, case.length]] * case.batch)
        losses = []
        for _ in range(steps):
            loss, grads = loss_and_grad(model, batch, lengths)
            mlx_optimizer.update(model, grads)
            mx.eval(model.parameters(), mlx_optimizer.state, loss)
            losses.append(loss.item())
        trained = {
            name: np.array(value, dtype=np.float64) for name, value in tree_flatten(model.trainable_parameters())
        }
        return losses, trained

    def rotary_base(self, case: ModelCase) -> float | None:
        """The rotary base mlx-lm builds the case's model with."""
        from mlx_lm.utils import load_model

        model, _ = load_model(mlx_directory(case))
        return getattr(getattr(model, "args", None), "rope_theta", None)

    def fused_directory(self, case: ModelCase, dequantize: bool = False) -> Path:
        """What mlx-lm's ``fuse`` command (``mlx_lm.fuse --model M --adapter-path A --save-path S``, with
        ``--dequantize`` where asked) saves."""
        from mlx_lm import fuse

        saved = new_directory("mlx-lm-fused-")
        adapters = str(self.adapter_directory(case))
        argv = [
            "mlx_lm.fuse",
            "--model",
            str(mlx_directory(case)),
            "--adapter-path",
            adapters,
            "--save-path",
            str(saved),
        ]
        with _arguments(argv + ["--dequantize"] * dequantize), contextlib.redirect_stdout(io.StringIO()):
            fuse.main()
        return saved

    def fused(self, case: ModelCase, dequantize: bool = False) -> nn.Module:
        """The model mlx-lm's ``fuse`` saved, loaded by mlx-lm."""
        return loaded(self.fused_directory(case, dequantize))


class MlxVlmEntryPoints:
    """How a user of mlx-vlm adapts a model's language part: ``get_peft_model`` with ``rank`` and ``alpha`` (the term
    is scaled by ``alpha / rank``, as peft's) on the modules named, ``save_adapter``, and ``load_adapters`` onto a
    fresh model. mlx-vlm has no command that fuses a model, nor mlx-lm's training path: the checks of those skip it."""

    roles: Mapping[str, str] = MappingProxyType({})
    architectures: tuple[str, ...] = ARCHITECTURES
    ROOT = MLX_VLM_ROOT
    adapter_schema = "mlx-vlm"

    def targets(self, case: ModelCase) -> list[str]:
        """The modules to adapt, by mlx-vlm's qualified names: the case's keys in its last `num_layers` blocks."""
        return [
            self.name(case, f"model.layers.{layer}.{key}") for layer in case.adapted_layers for key in case.adapted_keys
        ]

    def alpha(self, case: ModelCase) -> float:
        """mlx-vlm's ``alpha`` for the case's configuration: its term is scaled by ``alpha / rank``, as peft's."""
        return case.lora.scale * case.lora.rank

    def name(self, case: ModelCase, path: str) -> str:
        """mlx-vlm's name of the language part's `path` (as mlx-lm names a text model's: ``model.layers.1...``)."""
        return self.ROOT + (path.removeprefix("model.") if case.vision_language else path)

    def adapter_directory(self, case: ModelCase) -> Path:
        """The case's adapters as mlx-vlm's own ``save_adapter`` writes them, from a model `get_peft_model` adapted."""
        return memo.once(case, ("mlx-vlm adapters", type(self).__name__), lambda: self._saved(case))

    def _saved(self, case: ModelCase) -> Path:
        from mlx_vlm.trainer import get_peft_model, save_adapter
        from mlx_vlm.utils import load_model

        model = load_model(mlx_directory(case))
        rank = case.lora.rank
        get_peft_model(
            model, self.targets(case), rank=rank, alpha=self.alpha(case), dropout=0.0, verbose=False, use_dora=case.dora
        )
        weights, _ = mlx_lm_adapters(case)
        named = [(self.name(case, name), mx.array(value)) for name, value in weights.items()]
        absent = sorted({name for name, _ in named} - {name for name, _ in tree_flatten(model.parameters())})
        if absent:  # loading them with strict=False would drop them without a word
            raise ValueError(f"get_peft_model made no adapter parameter {', '.join(absent)}")
        model.load_weights(named, strict=False)
        directory = new_directory("mlx-vlm-adapters-")
        with contextlib.redirect_stdout(io.StringIO()):
            save_adapter(model, directory / "adapters.safetensors")
        return directory

    def rotary_base(self, case: ModelCase) -> float | None:
        """The rotary base mlx-vlm builds the case's model's language part with."""
        from mlx_vlm.utils import load_model

        language = load_model(mlx_directory(case)).language_model
        arguments = getattr(language, "args", None) or getattr(language, "config", None)
        return getattr(arguments, "rope_theta", None)

    def adapted(self, case: ModelCase, directory: Path | None = None) -> nn.Module:
        """A fresh model of the case's directory with the adapters of `directory` (the case's, as `adapter_directory`
        saved them) loaded by mlx-vlm's ``load_adapters``, in eval mode."""
        from mlx_vlm.trainer import load_adapters
        from mlx_vlm.utils import load_model

        model = load_model(mlx_directory(case))
        load_adapters(model, directory or self.adapter_directory(case))
        return model.eval()


def prepared_for_training(case: ModelCase, directory: Path) -> nn.Module:
    """The case's model as ``mlx_lm.lora`` prepares it for training from the adapter `directory`: frozen, its layers
    adapted by `linear_to_lora_layers` from the adapter configuration (which leaves only the adapters trainable), the
    adapters loaded as a resumed run loads them."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    config = json.loads((directory / "adapter_config.json").read_text())
    model, _ = load_model(mlx_directory(case))
    model.freeze()
    dora = config.get("fine_tune_type") == "dora"
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=dora)
    model.load_weights(str(directory / "adapters.safetensors"), strict=False)
    return model


def _saved_by_mlx_lm(case: ModelCase) -> Path:
    from mlx_lm.utils import save_config

    written = mlx_lm_adapter_directory(case)
    model = prepared_for_training(case, written)
    directory = new_directory("mlx-lm-adapters-")
    mx.save_safetensors(str(directory / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config(json.loads((written / "adapter_config.json").read_text()), directory / "adapter_config.json")
    return directory


@contextlib.contextmanager
def _arguments(argv: list[str]):
    before = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = before


def loaded(directory: Path) -> nn.Module:
    """The model in an MLX model directory, as mlx-lm loads it, in eval mode."""
    from mlx_lm.utils import load_model

    model, _ = load_model(directory)
    return model.eval()


def adapted_modules(model: nn.Module) -> set[str]:
    """The modules the package adapted (those holding ``lora_a``), by mlx-lm's names (mlx-vlm's language part's by
    the names of a text model's, `MlxVlmEntryPoints.name`'s inverse)."""
    found = set()
    for name, _ in tree_flatten(model.parameters()):
        if name.endswith(".lora_a"):
            module = name.removesuffix(".lora_a")
            if module.startswith(MlxVlmEntryPoints.ROOT):
                module = module.removeprefix(MlxVlmEntryPoints.ROOT)
                module = module if module.startswith("model.") else f"model.{module}"
            found.add(module)
    return found


def logits(model: nn.Module, case: ModelCase) -> np.ndarray:
    """The model's logits on the case's tokens (a vision-language model's without an image: mlx-vlm's models take
    ``pixel_values`` None for a prompt of text), float64."""
    output = model(mx.array(case.tokens), *([None] if case.vision_language else []))
    output = getattr(output, "logits", output)  # mlx-vlm's models return an output record
    return np.array(output.astype(mx.float32), dtype=np.float64)
