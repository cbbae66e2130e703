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

Converted: LoRA and DoRA on the linear layers of a text model's blocks, plain or rsLoRA. Refused, each with the
reason: what one side cannot say (rank or alpha patterns of several values, blocks other than the last
``num_layers``, DoRA on an embedding, mlx-vlm's older schema (rank, alpha), whose meaning changed between releases)
and what this converter does not convert yet (layers of experts, embeddings, layers outside the blocks, a
vision-language model's language part). A file whose factors disagree with its configuration's rank is refused,
never written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from foundation.model_cases import MLX_VLM_ROOT
from subjects.config_bridge import PEFT_PREFIX

MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
BLOCK = re.compile(r"^(?P<blocks>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<key>.+)$")
"""A path inside a model's blocks: ``model.layers.3.self_attn.q_proj`` is block 3's ``self_attn.q_proj``."""


class NotConvertible(ValueError):
    """An adapter that the other side cannot hold, or that this converter does not convert: the message says which
    and why."""


@dataclass(frozen=True)
class Adapter:
    """One adapted linear layer in peft's layouts: A (r, in), B (out, r), DoRA's magnitude (out,) or None."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class Adapters:
    """What both formats say, in one vocabulary: the adapted layers by path, the rank, the scale of the LoRA term,
    the dropout and whether it is DoRA."""

    layers: dict[str, Adapter]
    rank: int
    scale: float
    dropout: float
    dora: bool


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
    layers = {}
    for name in sorted(weights):
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise NotConvertible(f"{name}: not an adapter parameter of mlx-lm's (lora_a, lora_b, m)")
        if leaf != "lora_a":
            continue
        a, b = weights[name], weights.get(f"{path}.lora_b")
        if b is None:
            raise NotConvertible(f"{path}: lora_a without lora_b")
        if a.ndim != 2:
            raise NotConvertible(f"{path}: a layer of experts (lora_a {tuple(a.shape)}): not converted yet")
        _in_blocks(path)
        layers[path] = Adapter(a.T.contiguous(), b.T.contiguous(), weights.get(f"{path}.m"))
    rank, dora = int(parameters["rank"]), kind == "dora"
    _check(layers, {name.rpartition(".")[0] for name in weights}, rank, dora, directory / MLX_WEIGHTS)
    return Adapters(layers, rank, float(parameters["scale"]), float(parameters.get("dropout", 0.0)), dora)


def write_peft(adapters: Adapters, directory: Path) -> None:
    """`adapters` as peft saves them: its `LoraConfig` by peft's own ``save_pretrained``, the weights in its keys."""
    modules = _as_product(adapters.layers)
    if modules is None:
        target_modules, layers_to_transform = sorted(adapters.layers), None
    else:
        target_modules, layers_to_transform = sorted(modules[0]), sorted(modules[1])
    config = LoraConfig(
        r=adapters.rank,
        lora_alpha=adapters.scale * adapters.rank,
        lora_dropout=adapters.dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        use_dora=adapters.dora,
        task_type="CAUSAL_LM",
    )
    weights = {}
    for path, adapter in adapters.layers.items():
        weights[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapter.a.contiguous()
        weights[f"{PEFT_PREFIX}{path}.lora_B.weight"] = adapter.b.contiguous()
        if adapter.magnitude is not None:
            weights[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = adapter.magnitude.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(weights, str(directory / PEFT_WEIGHTS))


def read_peft(directory: Path) -> Adapters:
    """The adapters of a peft adapter directory (its config read by peft's own ``LoraConfig.from_pretrained``)."""
    if not (directory / "adapter_config.json").is_file():
        raise NotConvertible(f"{directory}: no adapter_config.json")
    config = LoraConfig.from_pretrained(str(directory))
    if config.target_parameters:
        raise NotConvertible(f"target_parameters {config.target_parameters}: layers of experts are not converted yet")
    for pattern, name in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        if pattern:
            raise NotConvertible(
                f"{name} {pattern}: mlx-lm gives every adapted layer one rank and one scale (lora_parameters)"
            )
    weights = _weights(directory / PEFT_WEIGHTS)
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
    _check(layers, {_peft_path(name) for name in weights}, config.r, config.use_dora, directory / PEFT_WEIGHTS)
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return Adapters(layers, config.r, scale, float(config.lora_dropout), bool(config.use_dora))


def _text_model_name(name: str) -> str:
    """mlx-lm's name of a weight mlx-vlm names ``language_model.model.layers...`` (a text model's)."""
    if not name.startswith(MLX_VLM_ROOT):
        return name
    if not name.startswith(f"{MLX_VLM_ROOT}model."):
        raise NotConvertible(f"{name}: a vision-language model's language part, not converted yet")
    return name.removeprefix(MLX_VLM_ROOT)


def write_mlx_lm(adapters: Adapters, directory: Path, blocks: int) -> None:
    """`adapters` as mlx-lm saves them, for a model of `blocks` blocks: ``keys`` in the last ``num_layers``."""
    modules = _as_product(adapters.layers)
    if modules is None:
        raise NotConvertible(
            "mlx-lm adapts the same keys in every adapted block; these adapters adapt "
            f"{', '.join(sorted(adapters.layers))}"
        )
    keys, indices = modules
    num_layers = blocks - min(indices)
    if sorted(indices) != list(range(min(indices), blocks)):
        raise NotConvertible(
            f"mlx-lm adapts the last num_layers blocks of the model's {blocks}; these adapters adapt blocks "
            f"{', '.join(map(str, sorted(indices)))}"
        )
    _save_mlx(adapters, directory, num_layers, sorted(keys), "")


def write_mlx(adapters: Adapters, directory: Path, package: str, blocks: int | None = None) -> None:
    """`adapters` as `package` (``mlx-lm``, for a model of `blocks` blocks, or ``mlx-vlm``) saves them."""
    if package == "mlx-vlm":
        write_mlx_vlm(adapters, directory)
    else:
        write_mlx_lm(adapters, directory, blocks)


def write_mlx_vlm(adapters: Adapters, directory: Path) -> None:
    """`adapters` as mlx-vlm's ``save_adapter`` saves a text model's: every layer by its full name under
    ``language_model.``, in ``keys``."""
    _save_mlx(adapters, directory, -1, sorted(f"{MLX_VLM_ROOT}{path}" for path in adapters.layers), MLX_VLM_ROOT)


def _save_mlx(adapters: Adapters, directory: Path, num_layers: int, keys: list[str], root: str) -> None:
    """The weights in MLX's layouts (A (in, r), B (r, out)) under `root`, and mlx-lm's configuration schema."""
    weights = {}
    for path, adapter in adapters.layers.items():
        weights[f"{root}{path}.lora_a"] = adapter.a.T.contiguous()
        weights[f"{root}{path}.lora_b"] = adapter.b.T.contiguous()
        if adapter.magnitude is not None:
            weights[f"{root}{path}.m"] = adapter.magnitude.contiguous()
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
