"""Adapter files between mlx-lm or mlx-vlm and peft: ``python -m conformance.adapters to-peft MLX_DIR OUT`` and
``python -m conformance.adapters to-mlx PEFT_DIR OUT --model MODEL_DIR`` (``--for mlx-vlm``: mlx-vlm's file).

mlx-lm saves ``adapters.safetensors`` (per adapted linear layer ``<path>.lora_a`` (in, r), ``<path>.lora_b``
(r, out) and, for DoRA, ``<path>.m`` (out,)) and ``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
``lora_parameters`` with ``rank``, ``scale``, ``dropout``, ``keys``); it adapts the layers named by ``keys`` in the
last ``num_layers`` blocks and scales each LoRA term by ``scale``. peft saves ``adapter_model.safetensors``
(``base_model.model.<path>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r), ``.lora_magnitude_vector``
(out,)) and its `LoraConfig` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ``layers_to_transform``,
``use_dora``, ``rank_pattern``, ``alpha_pattern``), and scales the term by ``lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``). The same adapters mean the same function on both sides.

mlx-vlm (0.7.10) saves the same files in mlx-lm's schema, naming each layer of a text model in full under its
``language_model.`` root (``keys`` lists them; ``num_layers`` is -1).

A mixture of experts' layers (mlx-lm's router ``mlp.gate`` and ``SwitchLinear`` layers ``mlp.switch_mlp.*``, A
(experts, r, in), B (experts, out, r); mlx-lm 0.28.2 and before saved A as (r·experts, in), expert-major, which is read
too) are peft's ``target_parameters`` on transformers' modules (the router's
``weight``, the fused ``mlp.experts.gate_up_proj`` and ``down_proj``), as `subjects.config_bridge` maps them: the gate
and up projections' adapters are one of rank 2r (``rank_pattern``, ``alpha_pattern``) with a block-diagonal B.

Converted: LoRA and DoRA on the linear layers of a text model's blocks, LoRA on a mixture's router and experts, plain
or rsLoRA. Refused, each with the reason: what one side cannot say (rank or alpha patterns other than a fused
parameter's r per layer, a fused B whose blocks off the diagonal are not zero, blocks other than the last
``num_layers``, DoRA on an embedding or on experts, mlx-vlm's older schema (rank, alpha), whose meaning changed
between releases) and what this converter does not convert yet (embeddings, layers outside the blocks, a
vision-language model's language part). A file whose factors disagree with its configuration's rank is refused,
never written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from foundation.model_cases import MLX_VLM_ROOT
from subjects.config_bridge import (
    FUSED_EXPERTS,
    PEFT_PREFIX,
    ROUTER,
    block_diagonal,
    experts_b_layout,
    experts_of,
    fused_adapter,
    peft_target,
)

MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
BLOCK = re.compile(r"^(?P<blocks>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<key>.+)$")
"""A path inside a model's blocks: ``model.layers.3.self_attn.q_proj`` is block 3's ``self_attn.q_proj``."""


class NotConvertible(ValueError):
    """An adapter that the other side cannot hold, or that this converter does not convert: the message says which
    and why."""


@dataclass(frozen=True)
class Adapter:
    """One adapted linear layer in peft's layouts: A (r, in), B (out, r), DoRA's magnitude (out,) or None; for a
    parameter of `experts` experts, A (r·experts, in) and B (out, r·experts)."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None
    experts: int = 0

    @property
    def rank(self) -> int:
        return self.a.shape[0] // max(self.experts, 1)


@dataclass(frozen=True)
class Adapters:
    """What both formats say, in one vocabulary: the adapted layers by path, the rank, the scale of the LoRA term,
    the dropout and whether it is DoRA; and a mixture's adapted parameters (peft's ``target_parameters``: a router's
    weight, transformers' fused experts) by their full names."""

    layers: dict[str, Adapter]
    rank: int
    scale: float
    dropout: float
    dora: bool
    parameters: dict[str, Adapter] = field(default_factory=dict)


def read_mlx(directory: Path) -> Adapters:
    """The adapters of an adapter directory mlx-lm or mlx-vlm saved (mlx-vlm's names of a text model's layers,
    ``language_model.model.layers...``, read as mlx-lm's)."""
    config = _json(directory / MLX_CONFIG)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise NotConvertible(f"fine_tune_type {kind!r}: not LoRA or DoRA adapters ({directory})")
    if "lora_parameters" not in config and "alpha" in config:
        raise NotConvertible(
            f"{directory / MLX_CONFIG}: mlx-vlm's older schema (rank, alpha), whose scale depends on the release "
            "that wrote it (0.4.4 scales the term by alpha, later releases by alpha / rank) and the file does not "
            "say which"
        )
    parameters = config.get("lora_parameters") or {}
    missing = [name for name in ("rank", "scale") if name not in parameters]
    if missing:
        raise NotConvertible(f"{directory / MLX_CONFIG}: lora_parameters has no {' or '.join(missing)}")
    weights = {_text_model_name(name): values for name, values in _weights(directory / MLX_WEIGHTS).items()}
    rank, dora = int(parameters["rank"]), kind == "dora"
    layers, experts = {}, {}
    for name in sorted(weights):
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise NotConvertible(f"{name}: not an adapter parameter of mlx-lm's (lora_a, lora_b, m)")
        if leaf != "lora_a":
            continue
        a, b = weights[name], weights.get(f"{path}.lora_b")
        if b is None:
            raise NotConvertible(f"{path}: lora_a without lora_b")
        _in_blocks(path)
        if a.ndim == 2 and b.ndim == 3 and a.shape[0] == b.shape[0] * rank:  # mlx-lm 0.28.2 and before: (r·experts, in)
            a = a.reshape(b.shape[0], rank, a.shape[1])
        if a.ndim == 3:
            experts[path] = (a, b)
        else:
            layers[path] = Adapter(a.T.contiguous(), b.T.contiguous(), weights.get(f"{path}.m"))
    if layers or not experts:
        paths = {name.rpartition(".")[0] for name in weights} - set(experts)
        _check(layers, paths, rank, dora, directory / MLX_WEIGHTS)
    routers = {path: layers.pop(path) for path in list(layers) if BLOCK.match(path)["key"] == ROUTER}
    found = {f"{path}.weight": adapter for path, adapter in routers.items()} | _fused_experts(experts, rank, dora)
    scale, dropout = float(parameters["scale"]), float(parameters.get("dropout", 0.0))
    return Adapters(layers, rank, scale, dropout, dora, found)


def _fused_experts(experts: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, dora: bool) -> dict[str, Adapter]:
    """mlx-lm's layers of experts (``mlp.switch_mlp.gate_proj``: A (experts, r, in), B (experts, out, r)) as peft's
    adapters of transformers' fused expert parameters (``mlp.experts.gate_up_proj``, `subjects.config_bridge`)."""
    if experts and dora:
        raise NotConvertible(f"{min(experts)}: DoRA on a layer of experts (neither mlx-lm nor peft has it)")
    members: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, (a, b) in experts.items():
        match = BLOCK.match(path)
        if match["key"] not in FUSED_EXPERTS:
            raise NotConvertible(f"{path}: a layer of experts transformers does not hold as {', '.join(FUSED_EXPERTS)}")
        if a.shape[1] != rank or b.shape[-1] != rank or a.shape[0] != b.shape[0]:
            raise NotConvertible(
                f"{path}: factors A {tuple(a.shape)} and B {tuple(b.shape)}, but mlx-lm's layouts are (experts, r, in) "
                f"and (experts, out, r) with the configuration's rank {rank}"
            )
        target, position = FUSED_EXPERTS[match["key"]]
        members.setdefault((f"{match['blocks']}.{match['index']}", target), {})[position] = (a, b)
    found = {}
    for (block, target), held in sorted(members.items()):
        positions = sorted(held)
        dtype, rows = held[positions[0]][0].dtype, held[positions[0]][1].shape[1]
        fused = sum(1 for parameter, _ in FUSED_EXPERTS.values() if parameter == target)
        members = [(held[p][0].float().numpy(), held[p][1].float().numpy()) for p in positions]
        at = [slice(p * rows, (p + 1) * rows) for p in positions]
        peft_a, peft_b = (torch.from_numpy(values).to(dtype) for values in fused_adapter(members, at, rows * fused))
        found[f"{block}.{target}"] = Adapter(peft_a, peft_b, experts=members[0][0].shape[0])
    return found


def write_peft(adapters: Adapters, directory: Path) -> None:
    """`adapters` as peft saves them: its `LoraConfig` by peft's own ``save_pretrained``, the weights in its keys."""
    modules = _as_product(adapters.layers) if adapters.layers else (set(), set())
    if modules is None:
        target_modules, layers_to_transform = sorted(adapters.layers), None
    else:
        target_modules, layers_to_transform = sorted(modules[0]), sorted(modules[1]) or None
    ranks = _rank_pattern(adapters)
    config = LoraConfig(
        r=adapters.rank,
        lora_alpha=adapters.scale * adapters.rank,
        lora_dropout=adapters.dropout,
        target_modules=target_modules,
        target_parameters=sorted(adapters.parameters, key=_wrapping_order) or None,
        layers_to_transform=layers_to_transform,
        rank_pattern=ranks,
        alpha_pattern={name: adapters.scale * rank for name, rank in ranks.items()},
        use_dora=adapters.dora,
        task_type="CAUSAL_LM",
    )
    weights = {}
    wrapped = _wrapping(list(adapters.parameters))
    for path, adapter in [*adapters.layers.items(), *((wrapped[t], a) for t, a in adapters.parameters.items())]:
        weights[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapter.a.contiguous()
        weights[f"{PEFT_PREFIX}{path}.lora_B.weight"] = adapter.b.contiguous()
        if adapter.magnitude is not None:
            weights[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = adapter.magnitude.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(weights, str(directory / PEFT_WEIGHTS))


def _rank_pattern(adapters: Adapters) -> dict[str, int]:
    """peft's ``rank_pattern`` for the parameters whose rank is not the configuration's (a fused parameter of
    experts holds r per member), by the parameter's name, which every block shares."""
    ranks: dict[str, set[int]] = {}
    for target, adapter in adapters.parameters.items():
        ranks.setdefault(target.rpartition(".")[2], set()).add(adapter.rank)
    for name, found in ranks.items():
        if len(found) > 1:
            raise NotConvertible(f"{name}: ranks {sorted(found)} in different blocks; peft's rank_pattern has one")
    return {name: rank for name, (rank,) in sorted(ranks.items()) if rank != adapters.rank}


WRAPPED_IN_ORDER = (
    peft_target(ROUTER).rpartition(".")[2],
    *dict.fromkeys(parameter.rpartition(".")[2] for parameter, _ in FUSED_EXPERTS.values()),
)
"""The names of the parameters this converter adapts, in the order their modules define them: a router's
``weight``, transformers' ``gate_up_proj`` before its ``down_proj``."""


def _wrapping_order(target: str) -> tuple[str, int]:
    module, _, name = target.rpartition(".")
    return module, WRAPPED_IN_ORDER.index(name)


def _wrapping(targets: list[str]) -> dict[str, str]:
    """Where peft keeps each target parameter's adapter. It wraps a module's adapted parameters in the order the
    module defines them, each wrapper taking the last as its ``base_layer``: ``mlp.experts.base_layer.lora_A``
    adapts ``gate_up_proj``, ``mlp.experts.lora_A`` ``down_proj``."""
    by_module: dict[str, list[str]] = {}
    for target in sorted(targets, key=_wrapping_order):
        by_module.setdefault(target.rpartition(".")[0], []).append(target)
    return {
        target: module + ".base_layer" * (len(held) - 1 - position)
        for module, held in by_module.items()
        for position, target in enumerate(held)
    }


def read_peft(directory: Path) -> Adapters:
    """The adapters of a peft adapter directory (its config read by peft's own ``LoraConfig.from_pretrained``)."""
    if not (directory / "adapter_config.json").is_file():
        raise NotConvertible(f"{directory}: no adapter_config.json")
    config = LoraConfig.from_pretrained(str(directory))
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    weights = _weights(directory / PEFT_WEIGHTS)
    parameters = _peft_parameters(config, weights)
    layers, leaves = {}, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    for name in sorted(weights):
        if not name.startswith(PEFT_PREFIX):
            raise NotConvertible(f"{name}: not a key of peft's ({PEFT_PREFIX}...)")
        if "lora_embedding_" in name:
            raise NotConvertible(f"{name}: an embedding's adapter, not converted yet")
        leaf = next((leaf for leaf in leaves if name.endswith(f".{leaf}")), None)
        if leaf is None:
            raise NotConvertible(f"{name}: not an adapter parameter of peft's LoRA ({', '.join(leaves)})")
        if leaf != "lora_A.weight":
            continue
        path = _peft_path(name)
        b = weights.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
        if b is None:
            raise NotConvertible(f"{path}: lora_A without lora_B")
        _in_blocks(path)
        layers[path] = Adapter(weights[name], b, weights.get(f"{PEFT_PREFIX}{path}.lora_magnitude_vector"))
    if layers or not parameters:
        _check(layers, {_peft_path(name) for name in weights}, config.r, config.use_dora, directory / PEFT_WEIGHTS)
    return Adapters(layers, config.r, scale, float(config.lora_dropout), bool(config.use_dora), parameters)


def _peft_parameters(config: LoraConfig, weights: dict[str, torch.Tensor]) -> dict[str, Adapter]:
    """The adapters of peft's ``target_parameters`` (a router's weight, transformers' fused experts, each named in
    full), taken out of `weights`; refuses ranks and alphas that mlx-lm's one rank and scale cannot say."""
    targets = list(config.target_parameters or [])
    for target in targets:
        match = BLOCK.match(target)
        if not match or match["key"] not in {peft_target(ROUTER), *(p for p, _ in FUSED_EXPERTS.values())}:
            raise NotConvertible(
                f"target_parameters {target!r}: not a router's weight or transformers' fused experts named in full "
                f"({', '.join(WRAPPED_IN_ORDER)} in a block)"
            )
    if config.use_dora and targets:
        raise NotConvertible(f"{targets[0]}: DoRA on a layer of experts (neither mlx-lm nor peft has it)")
    fused = set(WRAPPED_IN_ORDER[1:])
    for pattern, name in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        if set(pattern) - fused:
            raise NotConvertible(
                f"{name} {pattern}: mlx-lm gives every adapted layer one rank and one scale (lora_parameters)"
            )
    for name, rank in config.rank_pattern.items():
        alpha = config.alpha_pattern.get(name, config.lora_alpha)
        if rank % config.r or not math.isclose(alpha / rank, config.lora_alpha / config.r, rel_tol=1e-12):
            raise NotConvertible(
                f"{name}: rank {rank} and alpha {alpha} in peft's patterns; mlx-lm's layers of experts fused in it "
                f"hold rank {config.r} each, at one scale"
            )
    found = {}
    for target, path in _wrapping(targets).items():
        a, b = (weights.pop(f"{PEFT_PREFIX}{path}.{leaf}", None) for leaf in ("lora_A.weight", "lora_B.weight"))
        if a is None or b is None:
            raise NotConvertible(f"{target}: no lora_A and lora_B at {path}, where peft keeps its adapter")
        rank = config.rank_pattern.get(target.rpartition(".")[2], config.r)
        experts = 0 if target.endswith(peft_target(ROUTER)) else a.shape[0] // rank
        if a.shape[0] != rank * max(experts, 1) or b.shape[1] != a.shape[0]:
            raise NotConvertible(f"{target}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree with rank {rank}")
        found[target] = Adapter(a, b, experts=experts)
    return found


def _text_model_name(name: str) -> str:
    """mlx-lm's name of a weight mlx-vlm names ``language_model.model.layers...`` (a text model's)."""
    if not name.startswith(MLX_VLM_ROOT):
        return name
    if not name.startswith(f"{MLX_VLM_ROOT}model."):
        raise NotConvertible(f"{name}: a vision-language model's language part, not converted yet")
    return name.removeprefix(MLX_VLM_ROOT)


def write_mlx_lm(adapters: Adapters, directory: Path, blocks: int) -> None:
    """`adapters` as mlx-lm saves them, for a model of `blocks` blocks: ``keys`` in the last ``num_layers``."""
    layers = _mlx_layers(adapters)
    modules = _as_product(layers)
    if modules is None:
        raise NotConvertible(
            f"mlx-lm adapts the same keys in every adapted block; these adapters adapt {', '.join(sorted(layers))}"
        )
    keys, indices = modules
    num_layers = blocks - min(indices)
    if sorted(indices) != list(range(min(indices), blocks)):
        raise NotConvertible(
            f"mlx-lm adapts the last num_layers blocks of the model's {blocks}; these adapters adapt blocks "
            f"{', '.join(map(str, sorted(indices)))}"
        )
    _save_mlx(adapters, layers, directory, num_layers, sorted(keys), "")


def _mlx_layers(adapters: Adapters) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapted layer by mlx-lm's path, its weights by name (``lora_a``, ``lora_b``, ``m``) in MLX's layouts:
    a router's (in, r) and (r, out) as a linear layer's; a layer of experts' (experts, r, in) and (experts, out, r),
    split out of transformers' fused parameter."""
    found = {}
    for path, adapter in adapters.layers.items():
        found[path] = {"lora_a": adapter.a.T, "lora_b": adapter.b.T}
        if adapter.magnitude is not None:
            found[path]["m"] = adapter.magnitude
    for target, adapter in adapters.parameters.items():
        if not adapter.experts:
            found[target.rpartition(".")[0]] = {"lora_a": adapter.a.T, "lora_b": adapter.b.T}
            continue
        match = BLOCK.match(target)
        members = sorted((position, key) for key, (p, position) in FUSED_EXPERTS.items() if p == match["key"])
        rows = adapter.b.shape[0] // len(members)
        adapted = _adapted_members(target, adapter, members, rows, adapters.rank)
        at = [slice(position * rows, (position + 1) * rows) for position, _ in adapted]
        a, b = adapter.a.float().numpy(), adapter.b.float().numpy()
        split = experts_of(a, b, adapter.experts, adapters.rank, at)
        if not np.array_equal(experts_b_layout(block_diagonal([x for _, x in split], at, b.shape[0])), b):
            raise NotConvertible(
                f"{target}: B mixes the ranks of {' and '.join(k for _, k in members)} (peft trained it whole); "
                "mlx-lm's separate layers of experts cannot hold it"
            )
        for (_, key), (member_a, member_b) in zip(adapted, split, strict=True):
            block = f"{match['blocks']}.{match['index']}.{key}"
            found[block] = {
                "lora_a": torch.from_numpy(member_a).to(adapter.a.dtype),
                "lora_b": torch.from_numpy(member_b).to(adapter.b.dtype),
            }
    return found


def _adapted_members(
    target: str, adapter: Adapter, members: list[tuple[int, str]], rows: int, rank: int
) -> list[tuple[int, str]]:
    """Which of mlx-lm's layers of experts a fused parameter's adapter stands for: all of them where it holds r
    ranks for each; where it holds r, the one whose rows of B are not zero."""
    count = adapter.rank // rank
    if count == len(members):
        return members
    nonzero = [(p, k) for p, k in members if bool(adapter.b[p * rows : (p + 1) * rows].any())]
    if count != 1 or len(nonzero) != 1:
        raise NotConvertible(
            f"{target}: rank {adapter.rank} over {', '.join(k for _, k in members)}, with rows of "
            f"{len(nonzero)} of them adapted; mlx-lm holds rank {rank} for each layer it adapts"
        )
    return nonzero


def write_mlx(adapters: Adapters, directory: Path, package: str, blocks: int | None = None) -> None:
    """`adapters` as `package` (``mlx-lm``, for a model of `blocks` blocks, or ``mlx-vlm``) saves them."""
    if package == "mlx-vlm":
        write_mlx_vlm(adapters, directory)
    else:
        write_mlx_lm(adapters, directory, blocks)


def write_mlx_vlm(adapters: Adapters, directory: Path) -> None:
    """`adapters` as mlx-vlm's ``save_adapter`` saves a text model's: every layer by its full name under
    ``language_model.``, in ``keys``."""
    layers = _mlx_layers(adapters)
    _save_mlx(adapters, layers, directory, -1, sorted(f"{MLX_VLM_ROOT}{path}" for path in layers), MLX_VLM_ROOT)


def _save_mlx(
    adapters: Adapters,
    layers: dict[str, dict[str, torch.Tensor]],
    directory: Path,
    num_layers: int,
    keys: list[str],
    root: str,
) -> None:
    """The `layers`' weights (`_mlx_layers`) under `root`, and mlx-lm's configuration schema."""
    weights = {f"{root}{path}.{name}": w.contiguous() for path, held in layers.items() for name, w in held.items()}
    config = {
        "fine_tune_type": "dora" if adapters.dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": adapters.rank,
            "scale": adapters.scale,
            "dropout": adapters.dropout,
            "keys": keys,
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / MLX_WEIGHTS))
    (directory / MLX_CONFIG).write_text(json.dumps(config, indent=4) + "\n")


def model_blocks(directory: Path) -> int:
    """How many blocks the model saved in `directory` has (``num_hidden_layers`` of its ``config.json``)."""
    config = _json(directory / "config.json")
    if "num_hidden_layers" not in config:
        raise NotConvertible(
            f"{directory / 'config.json'}: no num_hidden_layers (a vision-language model's is not read yet)"
        )
    return int(config["num_hidden_layers"])


def _as_product(layers: dict[str, Adapter]) -> tuple[set[str], set[int]] | None:
    """The keys and block indices whose every pairing is adapted, and only those; None where the layers are not
    such a product (some key adapted in some blocks only), or lie in blocks of several names."""
    found = [BLOCK.match(path) for path in layers]
    if len({match["blocks"] for match in found}) != 1:
        return None
    keys, indices = {match["key"] for match in found}, {int(match["index"]) for match in found}
    return (keys, indices) if len(keys) * len(indices) == len(layers) else None


def _in_blocks(path: str) -> None:
    if not BLOCK.match(path):
        raise NotConvertible(f"{path}: a layer outside the model's blocks, not converted yet")


def _peft_path(name: str) -> str:
    """``model.layers.1.self_attn.q_proj`` of ``base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight``."""
    name = name.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    return name.rpartition(".")[0]


def _check(layers: dict[str, Adapter], paths: set[str], rank: int, dora: bool, where: Path) -> None:
    """Refuses a file (`where`) whose adapters are not whole pairs of factors of the configuration's rank, with a
    magnitude exactly where the configuration says DoRA; `paths` are the layers any of its weights belongs to."""
    if not layers:
        raise NotConvertible(f"{where}: no adapters")
    orphans = sorted(paths - set(layers))
    if orphans:
        raise NotConvertible(f"{orphans[0]}: a B factor or a magnitude without its A factor")
    for path, adapter in layers.items():
        if adapter.a.ndim != 2 or adapter.b.ndim != 2 or adapter.a.shape[0] != rank or adapter.b.shape[1] != rank:
            raise NotConvertible(
                f"{path}: factors A {tuple(adapter.a.shape)} and B {tuple(adapter.b.shape)} in peft's layouts "
                f"(r, in) and (out, r), but the configuration's rank is {rank} (a transposed or mis-ranked file)"
            )
        if dora and adapter.magnitude is None:
            raise NotConvertible(f"{path}: a DoRA adapter without its magnitude ({where})")
        if not dora and adapter.magnitude is not None:
            raise NotConvertible(f"{path}: a magnitude in a LoRA adapter's file ({where})")
        if adapter.magnitude is not None and adapter.magnitude.shape != (adapter.b.shape[0],):
            raise NotConvertible(
                f"{path}: magnitude {tuple(adapter.magnitude.shape)}, but B has {adapter.b.shape[0]} rows"
            )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotConvertible(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise NotConvertible(f"{path}: not JSON ({error})") from None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NotConvertible(f"{path}: no such file")
    return load_file(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.adapters", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_peft = commands.add_parser("to-peft", help="an mlx-lm or mlx-vlm adapter directory as peft's")
    to_peft.add_argument(
        "source", type=Path, help="mlx-lm's or mlx-vlm's adapter directory (adapters.safetensors, adapter_config.json)"
    )
    to_peft.add_argument("out", type=Path, help="the peft adapter directory to write")
    to_mlx = commands.add_parser("to-mlx", help="a peft adapter directory as mlx-lm's (or mlx-vlm's)")
    to_mlx.add_argument(
        "source", type=Path, help="peft's adapter directory (adapter_model.safetensors, adapter_config.json)"
    )
    to_mlx.add_argument("out", type=Path, help="the MLX adapter directory to write")
    to_mlx.add_argument(
        "--model", type=Path, help="for mlx-lm: the base model's directory, whose config.json gives the block count"
    )
    to_mlx.add_argument(
        "--for", dest="package", choices=("mlx-lm", "mlx-vlm"), default="mlx-lm", help="whose loader (mlx-lm)"
    )
    args = parser.parse_args(argv)
    if args.command == "to-mlx" and args.package == "mlx-lm" and args.model is None:
        parser.error("to-mlx for mlx-lm needs --model MODEL_DIR (mlx-lm's file names the adapted blocks by count)")
    if args.out.exists() and any(args.out.iterdir() if args.out.is_dir() else [args.out]):
        parser.error(f"{args.out} exists and is not an empty directory; give a new one")
    try:
        if args.command == "to-peft":
            adapters = read_mlx(args.source)
            write_peft(adapters, args.out)
        else:
            adapters = read_peft(args.source)
            blocks = model_blocks(args.model) if args.package == "mlx-lm" else None
            write_mlx(adapters, args.out, args.package, blocks)
    except NotConvertible as error:
        print(f"python -m conformance.adapters {args.command}: not converted: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"python -m conformance.adapters {args.command}: could not write {args.out}: {error}", file=sys.stderr)
        return 1
    kind = "DoRA" if adapters.dora else "LoRA"
    print(f"wrote {args.out}: {len(adapters.layers)} {kind} adapters of rank {adapters.rank}, scale {adapters.scale:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
