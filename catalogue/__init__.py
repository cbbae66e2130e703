"""The catalogue of wrong variants as subjects: ``--subject catalogue:<ClassName>`` runs one.

`WRONG_VARIANTS` says for each which check must catch it and in which dtypes the bug is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalogue import layers, models
from catalogue.layers import (
    PeftStyleConvention,
    PeftStyleDoRAConvention,
    PeftStyleDoRAEmbeddingConvention,
    PeftStyleEmbeddingConvention,
    PeftStyleSwitchConvention,
)
from conformance.families import (
    ADAM_MODEL_DTYPES,
    DORA_EMBEDDING,
    DORA_LINEAR,
    EMBEDDING,
    FAMILIES,
    LINEAR,
    MODEL,
    SWITCH_LINEAR,
)
from foundation.dtypes import CASE_DTYPES
from subjects.bridge import DoRAEmbeddingConvention, LoRALinearConvention
from subjects.known import Subject


def _subject(cls: type) -> Subject:
    """A subject named by where `resolve` finds it, so failure messages replay as they are."""
    name = f"{__name__}:{cls.__name__}"
    location = (f"{layers.__name__}:{cls.__name__}",)
    for correct, family, convention in (
        (layers.CorrectDoRALinear, DORA_LINEAR, PeftStyleDoRAConvention),
        (layers.CorrectLoRASwitchLinear, SWITCH_LINEAR, PeftStyleSwitchConvention),
        (layers.CorrectDoRAEmbedding, DORA_EMBEDDING, PeftStyleDoRAEmbeddingConvention),
        (layers.CorrectLoRAEmbedding, EMBEDDING, PeftStyleEmbeddingConvention),
    ):
        if issubclass(cls, correct):
            return Subject(name, "mlx", family.name, location, convention())
    return Subject(name, "mlx", LINEAR.name, location, PeftStyleConvention())


ALL_DTYPES = tuple(d.name for d in CASE_DTYPES)
HALF_DTYPES = tuple(d.name for d in CASE_DTYPES if d.name != "float32")


@dataclass(frozen=True)
class WrongVariant:
    subject: Subject
    check: str
    """The check that must fail."""
    visible_in: tuple[str, ...] = ALL_DTYPES
    """The dtypes in which the bug changes anything at all."""
    diagnosis: str = ""
    """Words the failure message's diagnosis must contain, where the pattern is recognisable."""
    base: str = ""
    """"quantized" where the bug only shows on a quantized base."""
    quantizations: tuple[str, ...] = ()
    """On a quantized base, the modes (`foundation.quantization.KINDS`) in which it shows; () for all."""
    by_check_run: bool = False
    """Caught by the check run's pooled verdict (`foundation.systematic`): each case stays within its bound."""

    @property
    def on_quantized_base(self) -> bool:
        return self.base == "quantized" or self.check == "requantize"

    @property
    def module(self) -> str:
        """The conformance test module whose `check` must catch it."""
        if self.check == "error_parity":
            return "test_error_parity.py"
        return FAMILIES[self.subject.family].on("quantized" if self.on_quantized_base else "float").module

    def __post_init__(self) -> None:
        if self.check != "error_parity":
            base = FAMILIES[self.subject.family].on("quantized" if self.on_quantized_base else "float")
            if base is None or base.check(self.check) is None:
                raise LookupError(f"{self.subject.name}: its family {self.subject.family} has no check {self.check}")

    @property
    def selection(self) -> tuple[str, ...]:
        """The pytest arguments that run `check` of `module` alone (with the checks whose names extend its own):
        what the other checks find of a wrong variant is never asked."""
        return () if self.check == "error_parity" else ("-k", f"test_{self.check}")


CorrectLoRALinear = _subject(layers.CorrectLoRALinear)
CorrectDoRALinear = _subject(layers.CorrectDoRALinear)
CorrectLoRAEmbedding = _subject(layers.CorrectLoRAEmbedding)
CorrectDoRAEmbedding = _subject(layers.CorrectDoRAEmbedding)
CorrectLoRASwitchLinear = _subject(layers.CorrectLoRASwitchLinear)
CORRECT = (CorrectLoRALinear, CorrectDoRALinear, CorrectLoRAEmbedding, CorrectDoRAEmbedding, CorrectLoRASwitchLinear)
WRONG_VARIANTS = {
    variant.subject.name.partition(":")[2]: variant
    for variant in (
        WrongVariant(_subject(layers.RawAlpha), "forward", diagnosis="(= r: the raw alpha"),
        WrongVariant(_subject(layers.SwappedScalingRules), "forward", diagnosis="scaling rules are swapped"),
        WrongVariant(_subject(layers.TransposedMerge), "merge"),
        WrongVariant(_subject(layers.MergeDropsBias), "merge"),
        WrongVariant(_subject(layers.DropoutInEval), "forward"),
        WrongVariant(_subject(layers.DropoutOnBasePath), "dropout", diagnosis="on the base layer's input too"),
        WrongVariant(_subject(layers.DropoutOnLoRAOutput), "dropout", diagnosis="on the LoRA term's output"),
        WrongVariant(
            _subject(layers.DropoutNotRescaled), "dropout_scaling", ("float32",), "without the 1 / (1 - p) rescaling"
        ),
        WrongVariant(_subject(layers.UpdateCastToFloat16), "forward", visible_in=("float32", "bfloat16")),
        WrongVariant(_subject(layers.SwappedAB), "forward"),
        WrongVariant(
            _subject(layers.GradientLeaksIntoBase), "grad", diagnosis="trainable only in the subject: ['linear.weight'"
        ),
        WrongVariant(_subject(layers.CachesLoRAProduct), "steps_sgd", ("float32",)),
        WrongVariant(_subject(layers.BiasAddedTwice), "forward", diagnosis="the bias is added twice"),
        WrongVariant(_subject(layers.MergeScalesTwice), "merge", diagnosis="the scale is applied twice"),
        WrongVariant(_subject(layers.FuseIgnoresAdapter), "merge", diagnosis="the LoRA term is missing"),
        WrongVariant(_subject(layers.DoRANormOverColumns), "forward"),
        WrongVariant(
            _subject(layers.DoRANormWithoutAdapter), "forward", diagnosis="taken from W alone, without the adapter"
        ),
        WrongVariant(_subject(layers.DoRAMergeForgetsMagnitude), "merge"),
        WrongVariant(_subject(layers.DoRANormNotDetached), "grad"),
        WrongVariant(_subject(layers.RequantizeIgnoresAdapter), "requantize"),
        # mxfp4 and mxfp8 have one bit width and group size each: MLX's defaults are the base's own.
        WrongVariant(
            _subject(layers.RequantizeWithDefaults), "requantize", quantizations=("affine", "affine-unaligned")
        ),
        WrongVariant(
            _subject(layers.QuantizedWidthRoundedDown),
            "forward",
            base="quantized",
            diagnosis="packed width x (32 // bits)",
            quantizations=("affine-unaligned",),
        ),
        WrongVariant(_subject(layers.EmbeddingLookupUnscaled), "forward"),
        WrongVariant(_subject(layers.AsLinearIgnoresAdapter), "as_linear"),
        WrongVariant(_subject(layers.LookupWithoutRangeCheck), "error_parity"),
        WrongVariant(_subject(layers.EmbeddingMergeTransposed), "merge"),
        WrongVariant(
            _subject(layers.LookupInDefaultDtype),
            "forward",
            visible_in=("float32", "float16"),
            base="quantized",
            quantizations=("mxfp4", "mxfp8"),  # an affine table's scales carry the dtype into the dequantized table
        ),
        WrongVariant(_subject(layers.DoRAEmbeddingNormPerToken), "forward"),
        WrongVariant(_subject(layers.AdapterIgnoresRouting), "forward"),
        WrongVariant(_subject(layers.ExpertBiasNotRouted), "forward"),
        WrongVariant(_subject(layers.SwitchFuseIgnoresAdapter), "merge"),
        WrongVariant(_subject(layers.ExpertIndexUnchecked), "error_parity"),
        WrongVariant(_subject(layers.RankCheckCrashes), "error_parity"),
        # Subtle: within the bound element by element, systematic over a check run (`foundation.systematic`).
        WrongVariant(_subject(layers.ScaleOffInBfloat16), "forward", visible_in=("bfloat16",), by_check_run=True),
        WrongVariant(_subject(layers.ScaleRoundedToBfloat16), "forward", visible_in=("float32", "float16")),
        WrongVariant(_subject(layers.UpdateAccumulatedInHalfPrecision), "merge", visible_in=HALF_DTYPES),
        WrongVariant(_subject(layers.BiasScaledSlightly), "forward"),
        # Wrong only with a float32 adapter on a half-precision base (`LinearParameters.adapter_dtype`).
        WrongVariant(_subject(layers.OutputInAdapterDtype), "forward", visible_in=HALF_DTYPES),
        WrongVariant(
            _subject(layers.AdapterCastToBaseDtype),
            "grad",
            visible_in=HALF_DTYPES,
            diagnosis="the update is computed in",
        ),
        WrongVariant(
            _subject(layers.UpdateInHalfPrecision),
            "grad",
            visible_in=HALF_DTYPES,
            diagnosis="the update is computed in",
        ),
        WrongVariant(_subject(layers.MergeInAdapterDtype), "merge", visible_in=HALF_DTYPES),
        WrongVariant(
            _subject(layers.EmbeddingUpdateInTableDtype),
            "grad",
            visible_in=HALF_DTYPES,
            diagnosis="the update is computed in",
        ),
        WrongVariant(
            _subject(layers.RequantizeInAdapterDtype),
            "requantize",
            visible_in=HALF_DTYPES,
            quantizations=("affine", "affine-unaligned"),  # microscaling scales are not floats of the model's dtype
        ),
    )
}


def _model_subject(convention: type) -> Subject:
    """A wrong way through mlx-lm's (or mlx-vlm's) whole-model entry points (`catalogue.models`)."""
    name = f"{__name__}:{convention.__name__}"
    if issubclass(convention, models.MlxVlmEntryPoints):
        return Subject(name, "mlx-vlm", MODEL.name, ("mlx_vlm.trainer:get_peft_model",), convention())
    return Subject(name, "mlx-lm", MODEL.name, ("mlx_lm.tuner.utils:load_adapters",), convention())


WRONG_VARIANTS.update(
    {
        variant.subject.name.partition(":")[2]: variant
        for variant in (
            WrongVariant(_model_subject(models.ScaleTimesRank), "logits", diagnosis="the adapters' contribution"),
            WrongVariant(_model_subject(models.OneLayerWithoutAdapter), "logits"),
            WrongVariant(_model_subject(models.TransposedOnSquareLayers), "logits"),
            WrongVariant(_model_subject(models.MagnitudesLeftOut), "logits"),
            WrongVariant(_model_subject(models.NumLayersOffByOne), "adapted_modules"),
            WrongVariant(_model_subject(models.SavesFactorsInPeftsLayout), "adapters_in_peft"),
            WrongVariant(_model_subject(models.ReadsScaleAsAlpha), "adapters_from_peft"),
            WrongVariant(_model_subject(models.TrainsTheBase), "steps_sgd"),
            WrongVariant(
                _model_subject(models.DefaultAdam),
                "steps_adam",
                visible_in=ADAM_MODEL_DTYPES,
                diagnosis="the adapters' movement is",
            ),
            WrongVariant(_model_subject(models.FuseDropsAdapters), "fuse", diagnosis="the adapters' contribution"),
            WrongVariant(_model_subject(models.AlphaIsScale), "logits", diagnosis="the adapters' contribution"),
        )
    }
)
# `--subject catalogue:<ClassName>` finds these module attributes.
globals().update({name: variant.subject for name, variant in WRONG_VARIANTS.items()})

# Layers with one known divergence, and the same with a second bug behind it (tests/test_known_divergences.py).
BEHIND_AN_ENTRY = {
    cls.__name__: _subject(cls)
    for cls in (
        layers.MergeUpcast,
        layers.MergeUpcastAndScalesTwice,
        layers.MergeRefusesBiasFree,
        layers.MergeRefusesBiasFreeAndScalesTwice,
        layers.RawAlphaDropsBias,
    )
}
globals().update(BEHIND_AN_ENTRY)

# Subclasses of an upstream class, built by its conventions as the catalogue's own subjects are.
UpstreamLoRADropsARank = Subject(
    f"{__name__}:UpstreamLoRADropsARank",
    "mlx-lm",
    "linear",
    (f"{layers.__name__}:UpstreamLoRADropsARank",),
    LoRALinearConvention(),
)
UpstreamDoRAEmbeddingNormWithoutAdapter = Subject(
    f"{__name__}:UpstreamDoRAEmbeddingNormWithoutAdapter",
    "mlx-lm",
    "dora_embedding",
    (f"{layers.__name__}:UpstreamDoRAEmbeddingNormWithoutAdapter",),
    DoRAEmbeddingConvention(),
)
FromBaseBuildsAnother = Subject(
    f"{__name__}:FromBaseBuildsAnother",
    "mlx-lm",
    "linear",
    (f"{layers.__name__}:FromBaseBuildsAnother",),
    LoRALinearConvention(),
)

# Subjects the installed packages do not provide: their checks are skipped with the reason.
AbsentClass = Subject(f"{__name__}:AbsentClass", "mlx", "linear", ("mlx.nn:NoSuchLoRALayer",), PeftStyleConvention())
AbsentPackage = Subject(
    f"{__name__}:AbsentPackage", "no-such-distribution", "linear", ("no_such_module:X",), PeftStyleConvention()
)
