"""mlx-lm's LoRA configuration as peft's: what the same adapters mean on both sides of a whole model.

mlx-lm (``adapter_config.json``: ``fine_tune_type``, ``num_layers``, ``lora_parameters`` with ``rank``, ``scale``,
``dropout`` and ``keys``) adapts the layers named by ``keys`` (paths in a block; by default every linear layer) of
the last ``num_layers`` blocks, and scales the LoRA term by ``scale``. peft's `LoraConfig` says the same with
``target_modules`` (matched against the end of a module's name), ``layers_to_transform`` (block indices) and
``lora_alpha`` (the term is scaled by ``lora_alpha / r``, so ``lora_alpha = scale * rank``).

A vision-language model's language part is named otherwise in transformers (``model.text_model.layers.1...``) than a
text model's, whose names the case uses, and its vision tower has layers of the same names (``self_attn.q_proj``) in
blocks of the same indices, which ``layers_to_transform`` would adapt too: there the bridge names each adapted module
in full.

A mixture of experts differs on the two sides. mlx-lm's router ``mlp.gate`` is a linear layer, transformers' a module
holding a ``weight``; mlx-lm keeps one `SwitchLinear` per projection (``mlp.switch_mlp.gate_proj``, ``up_proj``,
``down_proj``, each (experts, out, in)), transformers two parameters (``mlp.experts.gate_up_proj``, the gate's rows
then the up projection's, and ``mlp.experts.down_proj``). peft adapts parameters through ``target_parameters``, which
``layers_to_transform`` does not restrict, so the bridge names each adapted block's parameters in full. An adapter
of ``gate_up_proj`` stands for mlx-lm's adapters of both its projections: its A stacks theirs and its B is
block-diagonal, of rank 2r where both are adapted (``rank_pattern``, ``alpha_pattern``), and the blocks off the
diagonal, zero, must stay zero in training (`gradient_masks`).
"""

from __future__ import annotations

import numpy as np
from peft import LoraConfig

from foundation.model_cases import LANGUAGE_ROOTS, LINEAR_KEYS, ModelCase

ROUTER = "mlp.gate"
FUSED_EXPERTS = {
    "mlp.switch_mlp.gate_proj": ("mlp.experts.gate_up_proj", 0),
    "mlp.switch_mlp.up_proj": ("mlp.experts.gate_up_proj", 1),
    "mlp.switch_mlp.down_proj": ("mlp.experts.down_proj", 0),
}
"""Per layer of experts of mlx-lm's, transformers' parameter holding it and which of that parameter's blocks of rows
it is."""


def peft_target(key: str) -> str:
    """What peft adapts for mlx-lm's layer `key` of a block: a module (``self_attn.q_proj``) or a parameter
    (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``)."""
    if key == ROUTER:
        return f"{ROUTER}.weight"
    return FUSED_EXPERTS[key][0] if key in FUSED_EXPERTS else key


def peft_config(case: ModelCase) -> LoraConfig:
    """peft's configuration of the adapters mlx-lm's configuration puts on the case's model."""
    lora = case.lora
    blocks = list(case.adapted_layers)
    parameters = sorted({f"model.layers.{b}.{peft_target(k)}" for b in blocks for k in _parameter_keys(case)})
    fused = {target: rank for target, rank in _fused_ranks(case).items() if rank != lora.rank}
    modules = [key for key in case.adapted_keys if key in LINEAR_KEYS]
    if case.vision_language:
        modules = [case.reference_name(f"model.layers.{b}.{key}") for b in blocks for key in modules]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        layers_to_transform=None if case.vision_language else blocks,
        rank_pattern={target.rpartition(".")[2]: rank for target, rank in fused.items()},
        alpha_pattern={target.rpartition(".")[2]: lora.scale * rank for target, rank in fused.items()},
        use_dora=lora.fine_tune_type == "dora",
    )


def _parameter_keys(case: ModelCase) -> list[str]:
    return [key for key in case.adapted_keys if key not in LINEAR_KEYS]


def _members(case: ModelCase, target: str) -> list[str]:
    """mlx-lm's adapted layers of experts that transformers' parameter `target` holds, in its order of rows."""
    return sorted(
        (key for key in case.adapted_keys if key in FUSED_EXPERTS and FUSED_EXPERTS[key][0] == target),
        key=lambda key: FUSED_EXPERTS[key][1],
    )


def _fused_ranks(case: ModelCase) -> dict[str, int]:
    """Each adapted expert parameter's rank in peft: r per mlx-lm adapter it stands for."""
    targets = {FUSED_EXPERTS[key][0] for key in case.adapted_keys if key in FUSED_EXPERTS}
    return {target: case.lora.rank * len(_members(case, target)) for target in targets}


def peft_adapters(case: ModelCase) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The case's adapters as peft holds them, by what peft adapts (`peft_target`, in full:
    ``model.layers.1.mlp.experts.gate_up_proj``): ``lora_A.weight`` and ``lora_B.weight``. A linear layer's (and the
    router's) are the case's; an expert parameter's are peft's (r·experts, in) and (out, r·experts), expert e's rank
    entries at rows e·r... of A and at columns k·experts + e of B."""
    found = {}
    for path, (a, b) in case.adapters.items():
        block, key = block_and_key(path)
        if key not in FUSED_EXPERTS:
            found[f"{block}.{peft_target(key)}"] = (a, b)
    for block in sorted({block_and_key(path)[0] for path in case.adapters}):
        for target in _fused_ranks(case):
            members = _members(case, target)
            adapters = [case.adapters[f"{block}.{key}"] for key in members]
            held = sum(case.dims(key)[1] for key in FUSED_EXPERTS if FUSED_EXPERTS[key][0] == target)
            found[f"{block}.{target}"] = fused_adapter(adapters, [_rows(case, key) for key in members], held)
    return found


def block_and_key(path: str) -> tuple[str, str]:
    """``model.layers.1`` and ``mlp.gate`` of ``model.layers.1.mlp.gate``."""
    parts = path.split(".")
    return ".".join(parts[:3]), ".".join(parts[3:])


def _rows(case: ModelCase, key: str) -> slice:
    """The rows of transformers' expert parameter that mlx-lm's layer `key` is."""
    outputs = case.dims(key)[1]
    index = FUSED_EXPERTS[key][1]
    return slice(index * outputs, (index + 1) * outputs)


def _block_diagonal(case: ModelCase, target: str, blocks: list[np.ndarray]) -> np.ndarray:
    """The B (experts, out, r') of `target` whose diagonal blocks, one per member, are `blocks` (experts, rows, r)."""
    held = [key for key in FUSED_EXPERTS if FUSED_EXPERTS[key][0] == target]
    rows = [_rows(case, key) for key in _members(case, target)]
    return block_diagonal(blocks, rows, sum(case.dims(key)[1] for key in held))


def fused_adapter(
    members: list[tuple[np.ndarray, np.ndarray]], rows: list[slice], outputs: int
) -> tuple[np.ndarray, np.ndarray]:
    """peft's ``lora_A.weight`` and ``lora_B.weight`` of a fused expert parameter of `outputs` rows whose adapted
    members' adapters are `members` (A (experts, r, in), B (experts, its rows, r)) at their `rows`: A stacks theirs,
    B is block-diagonal (`experts_of`'s inverse)."""
    stacked = np.concatenate([a for a, _ in members], axis=1)
    return experts_layout(stacked, block_diagonal([b for _, b in members], rows, outputs))


def block_diagonal(blocks: list[np.ndarray], rows: list[slice], outputs: int) -> np.ndarray:
    """The B (experts, `outputs`, r') of a fused expert parameter whose diagonal blocks, one per adapted member, are
    `blocks` (experts, its rows, r) at its `rows`, each member's r columns after the last's; zero elsewhere."""
    experts, _, rank = blocks[0].shape
    b = np.zeros((experts, outputs, rank * len(blocks)), np.float32)
    for position, (values, at) in enumerate(zip(blocks, rows, strict=True)):
        b[:, at, position * rank : (position + 1) * rank] = values
    return b


def experts_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """peft's ``lora_A.weight`` (r·experts, in) and ``lora_B.weight`` (out, r·experts) of a parameter of experts
    whose adapters are A (experts, r, in) and B (experts, out, r): expert e's rank entries at rows e·r... of A and
    at columns k·experts + e of B."""
    experts, rank, inputs = a.shape
    return a.reshape(experts * rank, inputs), experts_b_layout(b)


def experts_b_layout(b: np.ndarray) -> np.ndarray:
    """peft's ``lora_B.weight`` (out, r·experts) of B (experts, out, r) (`experts_layout`)."""
    experts, outputs, rank = b.shape
    return b.transpose(1, 2, 0).reshape(outputs, rank * experts)


def gradient_masks(case: ModelCase) -> dict[str, np.ndarray]:
    """Per expert parameter that peft adapts, by `peft_adapters`' names: 1 where its ``lora_B.weight`` holds one of
    mlx-lm's adapters, 0 off the diagonal blocks, where training must leave it zero."""
    found = {}
    for block in sorted({block_and_key(path)[0] for path in case.adapters}):
        for target in _fused_ranks(case):
            ones = [np.ones((case.experts, case.dims(key)[1], case.lora.rank)) for key in _members(case, target)]
            found[f"{block}.{target}"] = experts_b_layout(_block_diagonal(case, target, ones))
    return found


def mlx_lm_adapters_of(case: ModelCase, target: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """mlx-lm's adapter parameters (``...q_proj.lora_a`` (in, r); ``...switch_mlp.up_proj.lora_a`` (experts, r, in))
    of peft's ``lora_A.weight`` `a` and ``lora_B.weight`` `b` of `target` (a name of `peft_adapters`)."""
    block, key = block_and_key(target)
    if key not in _fused_ranks(case):
        path = f"{block}.{ROUTER}" if key == peft_target(ROUTER) else target
        return {f"{path}.lora_a": a.T, f"{path}.lora_b": b.T}
    members = _members(case, key)
    found = {}
    split = experts_of(a, b, case.experts, case.lora.rank, [_rows(case, member) for member in members])
    for member, (member_a, member_b) in zip(members, split, strict=True):
        found[f"{block}.{member}.lora_a"], found[f"{block}.{member}.lora_b"] = member_a, member_b
    return found


def experts_of(
    a: np.ndarray, b: np.ndarray, experts: int, rank: int, rows: list[slice]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The adapters, A (experts, r, in) and B (experts, its rows, r), of each adapted member of a fused expert
    parameter (at `rows`, in order) of peft's ``lora_A.weight`` `a` and ``lora_B.weight`` `b` (`experts_layout`'s
    inverse: member k's rank entries are the k-th r of each expert's)."""
    stacked_a = a.reshape(experts, rank * len(rows), -1)
    stacked_b = b.reshape(b.shape[0], rank * len(rows), experts).transpose(2, 0, 1)
    ranks = [slice(position * rank, (position + 1) * rank) for position in range(len(rows))]
    return [(stacked_a[:, r], stacked_b[:, at, r]) for at, r in zip(rows, ranks, strict=True)]


PEFT_PREFIX = "base_model.model."
"""What peft's `get_peft_model` puts before a module's name in the model it wraps."""


def mlx_module(peft_path: str) -> str:
    """mlx-lm's name of the module peft names `peft_path` (a vision-language model's language part's by the names
    of a text model's blocks, as cases name them)."""
    name = peft_path.removeprefix(PEFT_PREFIX)
    for root in LANGUAGE_ROOTS.values():
        if name.startswith(root):
            return "model." + name.removeprefix(root)
    return name


def adapted_target(module_name: str, parameter_name: str | None) -> str:
    """The full `peft_target` of the peft layer named `module_name` in the adapted model, which adapts its module's
    parameter `parameter_name` (a ``ParamWrapper``; nested ones wrap ``base_layer``) or, None, the module."""
    module = mlx_module(module_name)
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module if parameter_name is None else f"{module}.{parameter_name}"


def mlx_lm_layers_of(case: ModelCase, target: str) -> list[str]:
    """The layers of mlx-lm's model that peft's adapted `target` (in full) stands for."""
    block, key = block_and_key(target)
    if key == peft_target(ROUTER):
        return [f"{block}.{ROUTER}"]
    if key in {parameter for parameter, _ in FUSED_EXPERTS.values()}:
        held = [layer for layer, (parameter, _) in FUSED_EXPERTS.items() if parameter == key]
        return [f"{block}.{layer}" for layer in _members(case, key) or held]
    return [target]
