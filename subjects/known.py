"""Subjects: the MLX implementations under test, found in whatever mlx-vlm / mlx-lm is installed.

Classes moved between modules across releases, so each subject lists the public places it has lived
in. A subject that the installed version does not have is *not provided*: its checks are skipped
with the version in the reason. A package that is installed but fails to import is an error.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import mlx.nn as nn

from foundation.cases import EmbeddingCase, LinearCase
from foundation.memo import LayerRun, once_per_case
from foundation.switch_cases import SwitchCase
from subjects.bridge import (
    Convention,
    DoRAEmbeddingConvention,
    DoRALinearConvention,
    LoRAEmbeddingConvention,
    LoRaLayerConvention,
    LoRALinearConvention,
    LoRASwitchLinearConvention,
)
from subjects.models import MlxLmEntryPoints, MlxVlmEntryPoints


class NotProvided(Exception):
    """The installed packages do not provide this subject."""


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


VERSIONED = ("mlx", "mlx-vlm", "mlx-lm", "peft", "torch", "numpy", "hypothesis")
"""The distributions whose versions a run (and a study) records."""


def versions() -> dict[str, str | None]:
    return {name: installed_version(name) for name in VERSIONED}


@dataclass(frozen=True, eq=False)
class Subject:
    name: str
    """``package.Class``, e.g. ``mlx_vlm.LoRaLayer``: how options, ids and reports name it."""
    distribution: str
    family: str
    locations: tuple[str, ...]
    """``module:attribute`` places to look, newest first."""
    convention: Convention | MlxLmEntryPoints | MlxVlmEntryPoints
    """How the implementation is built and called: a layer's `Convention`, or a whole model's entry points."""

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis and IPython print it
        printer.text(repr(self))

    @cached_property
    def implementation(self) -> type:
        """The class under test; raises `NotProvided` when the installed version has none."""
        version = installed_version(self.distribution)
        if version is None:
            raise NotProvided(f"{self.distribution} is not installed")
        for location in self.locations:
            module_name, attribute = location.split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if not (error.name or "").startswith(module_name.split(".")[0]):
                    raise  # a dependency is missing: a broken environment, not an absent subject
                continue
            if hasattr(module, attribute):
                return getattr(module, attribute)
        places = ", ".join(self.locations)
        raise NotProvided(f"{self.distribution} {version} does not provide it (looked in {places})")

    def provenance(self) -> str:
        """Where the implementation comes from, e.g. ``mlx-vlm 0.7.10 mlx_vlm.trainer.peft.lora.LoRaLayer``."""
        cls = self.implementation
        return f"{self.distribution} {installed_version(self.distribution)} {cls.__module__}.{cls.__qualname__}"

    def not_provided_reason(self) -> str | None:
        try:
            self.implementation
        except NotProvided as reason:
            return f"{self.name} not provided: {reason}"
        return None

    def construct(self, case: LinearCase | EmbeddingCase | SwitchCase, r: int, dropout: float) -> nn.Module:
        return self.convention.construct(self.implementation, case, r, dropout)

    def build(self, case: LinearCase | EmbeddingCase | SwitchCase) -> nn.Module:
        return self.convention.build(self.implementation, case)

    def merge(self, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return self.convention.merge(self.implementation, layer, dequantize)

    def run(self, case: LinearCase | EmbeddingCase | SwitchCase) -> LayerRun:
        """The subject's layer for the case, shared by the checks that only call it or merge it (dequantized)."""
        return _run(case, self)

    def magnitude_at_creation(self, case: LinearCase | EmbeddingCase, with_adapter: bool) -> Any:
        return self.convention.magnitude_at_creation(self.implementation, case, with_adapter)


@once_per_case
def _run(case: LinearCase | EmbeddingCase | SwitchCase, subject: Subject) -> LayerRun:
    return LayerRun(case, subject.build, subject.merge)


CATALOGUE: tuple[Subject, ...] = (
    Subject(
        "mlx_vlm.LoRaLayer",
        "mlx-vlm",
        "linear",
        ("mlx_vlm.trainer:LoRaLayer", "mlx_vlm.trainer.peft:LoRaLayer", "mlx_vlm.trainer.lora:LoRaLayer"),
        LoRaLayerConvention(),
    ),
    Subject(
        "mlx_vlm.LoRALinear",
        "mlx-vlm",
        "linear",
        ("mlx_vlm.trainer:LoRALinear", "mlx_vlm.trainer.peft:LoRALinear", "mlx_vlm.trainer.lora:LoRALinear"),
        LoRALinearConvention(),
    ),
    Subject(
        "mlx_lm.LoRALinear",
        "mlx-lm",
        "linear",
        ("mlx_lm.tuner.lora:LoRALinear",),
        LoRALinearConvention(),
    ),
    Subject(
        "mlx_vlm.DoRALinear",
        "mlx-vlm",
        "dora_linear",
        ("mlx_vlm.trainer:DoRALinear", "mlx_vlm.trainer.peft:DoRALinear", "mlx_vlm.trainer.dora:DoRALinear"),
        DoRALinearConvention(),
    ),
    Subject(
        "mlx_lm.DoRALinear",
        "mlx-lm",
        "dora_linear",
        ("mlx_lm.tuner.dora:DoRALinear",),
        DoRALinearConvention(),
    ),
    Subject(
        "mlx_vlm.LoRAEmbedding",
        "mlx-vlm",
        "embedding",
        ("mlx_vlm.trainer:LoRAEmbedding", "mlx_vlm.trainer.peft:LoRAEmbedding"),
        LoRAEmbeddingConvention(),
    ),
    Subject(
        "mlx_lm.LoRAEmbedding",
        "mlx-lm",
        "embedding",
        ("mlx_lm.tuner.lora:LoRAEmbedding",),
        LoRAEmbeddingConvention(),
    ),
    Subject(
        "mlx_vlm.DoRAEmbedding",
        "mlx-vlm",
        "dora_embedding",
        ("mlx_vlm.trainer:DoRAEmbedding", "mlx_vlm.trainer.peft:DoRAEmbedding"),
        DoRAEmbeddingConvention(),
    ),
    Subject(
        "mlx_lm.DoRAEmbedding",
        "mlx-lm",
        "dora_embedding",
        ("mlx_lm.tuner.dora:DoRAEmbedding",),
        DoRAEmbeddingConvention(),
    ),
    Subject(
        "mlx_vlm.LoRASwitchLinear",
        "mlx-vlm",
        "switch_linear",
        ("mlx_vlm.trainer:LoRASwitchLinear", "mlx_vlm.trainer.peft:LoRASwitchLinear"),
        LoRASwitchLinearConvention(),
    ),
    Subject(
        "mlx_lm.LoRASwitchLinear",
        "mlx-lm",
        "switch_linear",
        ("mlx_lm.tuner.lora:LoRASwitchLinear",),
        LoRASwitchLinearConvention(),
    ),
    Subject(
        "mlx_lm.load_adapters",
        "mlx-lm",
        "model",
        ("mlx_lm.tuner.utils:load_adapters",),
        MlxLmEntryPoints(),
    ),
    Subject(
        "mlx_vlm.get_peft_model",
        "mlx-vlm",
        "model",
        ("mlx_vlm.trainer:get_peft_model", "mlx_vlm.trainer.peft:get_peft_model"),
        MlxVlmEntryPoints(),
    ),
)
BY_NAME = {subject.name: subject for subject in CATALOGUE}


def resolve(name: str) -> Subject:
    """A catalogue subject by name, or a `Subject` object at an import path ``module:attribute``.

    The import path lets a user (and ``tests/``) run the suite on their own layer.
    """
    if name in BY_NAME:
        return BY_NAME[name]
    if ":" in name:
        module_name, attribute = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise LookupError(f"subject {name!r}: cannot import {module_name}: {error}") from error
        subject = getattr(module, attribute, None)
        if isinstance(subject, Subject):
            return subject
    valid = ", ".join(BY_NAME)
    raise LookupError(f"unknown subject {name!r}; valid subjects: {valid} (or module:attribute of a Subject)")


def select(names: list[str]) -> list[Subject]:
    """The subjects named, in order and once each; a name with ``*`` matches catalogue names (``mlx_vlm.*``)."""
    chosen: list[Subject] = []
    for name in names:
        if "*" in name and ":" not in name:
            found = [s for s in CATALOGUE if fnmatch.fnmatchcase(s.name, name)]
            if not found:
                raise LookupError(f"subject pattern {name!r} matches no subject; valid subjects: {', '.join(BY_NAME)}")
        else:
            found = [resolve(name)]
        chosen += [s for s in found if s not in chosen]
    return chosen
