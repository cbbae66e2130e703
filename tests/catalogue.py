"""The catalogue of wrong variants as subjects: ``--subject tests.catalogue:<ClassName>`` runs one.

`WRONG_VARIANTS` says for each which check must catch it and in which dtypes the bug is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from conformance.dtypes import CASE_DTYPES
from conformance.subjects import Subject
from reference.bridge import DoRAEmbeddingConvention, LoRALinearConvention
from tests import lora_layers
from tests.lora_layers import (
    PeftStyleConvention,
    PeftStyleDoRAConvention,
    PeftStyleDoRAEmbeddingConvention,
    PeftStyleEmbeddingConvention,
    PeftStyleSwitchConvention,
)


def _subject(cls: type) -> Subject:
    """A subject named by where `resolve` finds it, so failure messages replay as they are."""
    name = f"{__name__}:{cls.__name__}"
    location = (f"{lora_layers.__name__}:{cls.__name__}",)
    if issubclass(cls, lora_layers.CorrectDoRALinear):
        return Subject(name, "mlx", "dora_linear", location, PeftStyleDoRAConvention())
    if issubclass(cls, lora_layers.CorrectLoRASwitchLinear):
        return Subject(name, "mlx", "switch_linear", location, PeftStyleSwitchConvention())
    if issubclass(cls, lora_layers.CorrectDoRAEmbedding):
        return Subject(name, "mlx", "dora_embedding", location, PeftStyleDoRAEmbeddingConvention())
    if issubclass(cls, lora_layers.CorrectLoRAEmbedding):
        return Subject(name, "mlx", "embedding", location, PeftStyleEmbeddingConvention())
    return Subject(name, "mlx", "linear", location, PeftStyleConvention())


ALL_DTYPES = tuple(d.name for d in CASE_DTYPES)


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
    """On a quantized base, the modes (`conformance.quantization.KINDS`) in which it shows; () for all."""

    @property
    def module(self) -> str:
        """The conformance test module whose `check` must catch it."""
        if self.base == "quantized":
            return f"test_quantized_{self.subject.family}.py"
        if self.check == "requantize":
            return "test_quantized_linear.py"
        if self.check == "error_parity":
            return "test_error_parity.py"
        return f"test_{self.subject.family}.py"

    @property
    def selection(self) -> tuple[str, ...]:
        """The pytest arguments that run `check` of `module` alone (with the checks whose names extend its own):
        what the other checks find of a wrong variant is never asked."""
        return () if self.check == "error_parity" else ("-k", f"test_{self.check}")


CorrectLoRALinear = _subject(lora_layers.CorrectLoRALinear)
CorrectDoRALinear = _subject(lora_layers.CorrectDoRALinear)
CorrectLoRAEmbedding = _subject(lora_layers.CorrectLoRAEmbedding)
CorrectDoRAEmbedding = _subject(lora_layers.CorrectDoRAEmbedding)
CorrectLoRASwitchLinear = _subject(lora_layers.CorrectLoRASwitchLinear)
CORRECT = (CorrectLoRALinear, CorrectDoRALinear, CorrectLoRAEmbedding, CorrectDoRAEmbedding, CorrectLoRASwitchLinear)
WRONG_VARIANTS = {
    variant.subject.name.partition(":")[2]: variant
    for variant in (
        WrongVariant(_subject(lora_layers.RawAlpha), "forward", diagnosis="(= r: the raw alpha"),
        WrongVariant(_subject(lora_layers.SwappedScalingRules), "forward", diagnosis="scaling rules are swapped"),
        WrongVariant(_subject(lora_layers.TransposedMerge), "merge"),
        WrongVariant(_subject(lora_layers.MergeDropsBias), "merge"),
        WrongVariant(_subject(lora_layers.DropoutInEval), "forward"),
        WrongVariant(_subject(lora_layers.DropoutOnBasePath), "dropout", diagnosis="on the base layer's input too"),
        WrongVariant(_subject(lora_layers.DropoutOnLoRAOutput), "dropout", diagnosis="on the LoRA term's output"),
        WrongVariant(
            _subject(lora_layers.DropoutNotRescaled), "dropout_scaling", ("float32",), "without the 1 / (1 - p) rescaling"
        ),
        WrongVariant(_subject(lora_layers.UpdateCastToFloat16), "forward", visible_in=("float32", "bfloat16")),
        WrongVariant(_subject(lora_layers.SwappedAB), "forward"),
        WrongVariant(_subject(lora_layers.GradientLeaksIntoBase), "grad", diagnosis="trainable only in the subject: ['linear.weight'"),
        WrongVariant(_subject(lora_layers.CachesLoRAProduct), "steps_sgd", ("float32",)),
        WrongVariant(_subject(lora_layers.BiasAddedTwice), "forward", diagnosis="the bias is added twice"),
        WrongVariant(_subject(lora_layers.MergeScalesTwice), "merge", diagnosis="the scale is applied twice"),
        WrongVariant(_subject(lora_layers.FuseIgnoresAdapter), "merge", diagnosis="the LoRA term is missing"),
        WrongVariant(_subject(lora_layers.DoRANormOverColumns), "forward"),
        WrongVariant(
            _subject(lora_layers.DoRANormWithoutAdapter), "forward", diagnosis="taken from W alone, without the adapter"
        ),
        WrongVariant(_subject(lora_layers.DoRAMergeForgetsMagnitude), "merge"),
        WrongVariant(_subject(lora_layers.DoRANormNotDetached), "grad"),
        WrongVariant(_subject(lora_layers.RequantizeIgnoresAdapter), "requantize"),
        # mxfp4 and mxfp8 have one bit width and group size each: MLX's defaults are the base's own.
        WrongVariant(_subject(lora_layers.RequantizeWithDefaults), "requantize", quantizations=("affine", "affine-unaligned")),
        WrongVariant(
            _subject(lora_layers.QuantizedWidthRoundedDown), "forward", base="quantized", diagnosis="packed width x (32 // bits)",
            quantizations=("affine-unaligned",),
        ),
        WrongVariant(_subject(lora_layers.EmbeddingLookupUnscaled), "forward"),
        WrongVariant(_subject(lora_layers.AsLinearIgnoresAdapter), "as_linear"),
        WrongVariant(_subject(lora_layers.LookupWithoutRangeCheck), "error_parity"),
        WrongVariant(_subject(lora_layers.EmbeddingMergeTransposed), "merge"),
        WrongVariant(
            _subject(lora_layers.LookupInDefaultDtype), "forward", visible_in=("float32", "float16"), base="quantized",
            quantizations=("mxfp4", "mxfp8"),  # an affine table's scales carry the dtype into the dequantized table
        ),
        WrongVariant(_subject(lora_layers.DoRAEmbeddingNormPerToken), "forward"),
        WrongVariant(_subject(lora_layers.AdapterIgnoresRouting), "forward"),
        WrongVariant(_subject(lora_layers.ExpertBiasNotRouted), "forward"),
        WrongVariant(_subject(lora_layers.SwitchFuseIgnoresAdapter), "merge"),
        WrongVariant(_subject(lora_layers.ExpertIndexUnchecked), "error_parity"),
        WrongVariant(_subject(lora_layers.RankCheckCrashes), "error_parity"),
    )
}
# `--subject tests.catalogue:<ClassName>` finds these module attributes.
globals().update({name: variant.subject for name, variant in WRONG_VARIANTS.items()})

# Layers with one known divergence, and the same with a second bug behind it (tests/test_known_divergences.py).
BEHIND_AN_ENTRY = {
    cls.__name__: _subject(cls)
    for cls in (lora_layers.MergeUpcast, lora_layers.MergeUpcastAndScalesTwice, lora_layers.MergeRefusesBiasFree,
                lora_layers.MergeRefusesBiasFreeAndScalesTwice, lora_layers.RawAlphaDropsBias)
}
globals().update(BEHIND_AN_ENTRY)

# Subclasses of an upstream class, built by its conventions as the catalogue's own subjects are.
UpstreamLoRADropsARank = Subject(f"{__name__}:UpstreamLoRADropsARank", "mlx-lm", "linear",
                                 (f"{lora_layers.__name__}:UpstreamLoRADropsARank",), LoRALinearConvention())
UpstreamDoRAEmbeddingNormWithoutAdapter = Subject(
    f"{__name__}:UpstreamDoRAEmbeddingNormWithoutAdapter", "mlx-lm", "dora_embedding",
    (f"{lora_layers.__name__}:UpstreamDoRAEmbeddingNormWithoutAdapter",), DoRAEmbeddingConvention(),
)
FromBaseBuildsAnother = Subject(f"{__name__}:FromBaseBuildsAnother", "mlx-lm", "linear",
                                (f"{lora_layers.__name__}:FromBaseBuildsAnother",), LoRALinearConvention())

# Subjects the installed packages do not provide: their checks are skipped with the reason.
AbsentClass = Subject(f"{__name__}:AbsentClass", "mlx", "linear", ("mlx.nn:NoSuchLoRALayer",), PeftStyleConvention())
AbsentPackage = Subject(f"{__name__}:AbsentPackage", "no-such-distribution", "linear", ("no_such_module:X",), PeftStyleConvention())
