"""The reference side of a whole model: transformers builds and saves it, peft adapts it (`get_peft_model`).

Both sides load the model transformers saved (`foundation.model_files`), each through its own loading path
(``from_pretrained`` here, mlx-lm's `load_model` with its ``sanitize`` there). The oracle is the same model and
adapters loaded in float64 (every weight of the case's dtype, and every float32 adapter entry, is exact there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import PeftModel, get_peft_model

from foundation.memo import once_per_case
from foundation.model_cases import ModelCase
from foundation.model_files import auto_class, dora_magnitudes, new_directory, reference_directory
from reference.quantized_products import products_in_dtype
from subjects.config_bridge import (
    FUSED_EXPERTS,
    ROUTER,
    adapted_target,
    block_and_key,
    gradient_masks,
    mlx_lm_adapters_of,
    mlx_lm_layers_of,
    mlx_module,
    peft_adapters,
    peft_config,
)


def loaded(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model saved in `directory`, as transformers loads it in `dtype`, in eval mode. A mixture's experts run
    transformers' eager implementation (the formula as its modeling file writes it, a loop over the experts): its
    default, ``grouped_mm``, has no float64."""
    return loaded_and_problems(directory, dtype)[0]


def loaded_and_problems(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, str | None]:
    """`loaded`, and what transformers could not map when it loaded `directory`, if anything: the weights it
    initialised at random (missing from the files) and those of the files it ignored."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report says what `info` does, on the console
    architecture = json.loads((directory / "config.json").read_text())["model_type"]
    try:
        model, info = auto_class(architecture).from_pretrained(
            directory, dtype=dtype, experts_implementation="eager", output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    said = [f"initialised {len(missing)} weights at random ({', '.join(missing)})"] if missing else []
    said += [f"ignored {len(unexpected)} weights it does not know ({', '.join(unexpected)})"] if unexpected else []
    return model.eval(), (f"transformers {' and '.join(said)}" if said else None)


def sums_quantized_in_dtype(case: ModelCase) -> bool:
    """Whether MLX's kernel sums the products of the case's quantized layers in the model's dtype (it does in half
    precision; `reference.quantized_products`), an order peft's model on the dequantized values does not take."""
    return case.quantization is not None and case.dtype.torch != torch.float32


def mlx_quantized_logits(case: ModelCase) -> np.ndarray:
    """The logits in the order MLX takes on a quantized base in half precision: each LoRA term rounded first, the
    attention's scores stored in the dtype (``eager``), the quantized layers' products summed in the dtype."""
    with borrowed(case, case.dtype.torch, term_cast_first=True) as model:
        model.set_attn_implementation("eager")
        with products_in_dtype(model, case):
            return logits(model, case)


def loss_orders(case: ModelCase) -> tuple[bool, ...]:
    """Whether the loss is computed from the logits in the model's dtype (`trained`'s `loss_in_dtype`): both where
    that dtype is coarser than float32, the one computation where it is float32."""
    return (False, True) if case.dtype.torch != torch.float32 else (False,)


def adapted(case: ModelCase, dtype: torch.dtype, term_cast_first: bool = False) -> torch.nn.Module:
    """The saved model loaded in `dtype`, adapted by peft as the bridge maps mlx-lm's configuration, with the case's
    adapters, in eval mode. peft adds each float32 LoRA term to the base output in float32 and rounds the sum once;
    with `term_cast_first`, the term is rounded to `dtype` first and added there, as mlx-lm's LoRA layers do.

    A copy of the one loaded for the case, for a caller that keeps or changes it (a merge); loading it (transformers'
    ``from_pretrained``, peft's ``get_peft_model``) costs ten times the copy, and `borrowed` costs nothing."""
    return copy.deepcopy(_adapted_once(case, dtype, term_cast_first))


@contextlib.contextmanager
def borrowed(case: ModelCase, dtype: torch.dtype, term_cast_first: bool = False) -> Iterator[torch.nn.Module]:
    """`adapted`'s model itself, not a copy (a copy costs as much as a few training steps of a tiny model), given back
    as loaded: its trainable parameters and their gradients restored, in eval mode, with the attention it had. Its
    borrower removes the hooks it adds."""
    model = _adapted_once(case, dtype, term_cast_first)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    attention = model.config._attn_implementation
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in trainable:
                    parameter.copy_(trainable[name])
                    parameter.grad = None
        model.set_attn_implementation(attention)
        model.eval()


@once_per_case
def _adapted_once(case: ModelCase, dtype: torch.dtype, term_cast_first: bool) -> torch.nn.Module:
    with _peft_quietly():
        model = get_peft_model(loaded(reference_directory(case), dtype), peft_config(case))
    layers = lora_layers(model)
    magnitudes = dora_magnitudes(case)
    with torch.no_grad():
        for target, (a, b) in peft_adapters(case).items():
            layer = layers[target]
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
            if target in magnitudes:
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(magnitudes[target]))
            elif term_cast_first and not hasattr(layer, "parameter_name"):
                layer.register_forward_hook(_term_cast_first)
    return model.eval()


@once_per_case
def saved_adapters(case: ModelCase) -> Path:
    """The case's adapters as peft's ``save_pretrained`` saves them, from its adapted model in the case's dtype."""
    directory = new_directory("peft-adapters-")
    with borrowed(case, case.dtype.torch) as model:
        model.save_pretrained(str(directory))
    return directory


def with_saved_adapters(case: ModelCase, directory: Path) -> torch.nn.Module:
    """The case's model in its dtype with the adapters of a peft adapter `directory`, as peft's
    ``PeftModel.from_pretrained`` loads them, in eval mode."""
    with _peft_quietly():
        return PeftModel.from_pretrained(loaded(reference_directory(case), case.dtype.torch), str(directory)).eval()


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft's warnings on building an adapted model that say nothing here: it checks rank and alpha patterns against
    ``target_modules`` only (they apply to ``target_parameters`` too), and meets a transformers deprecation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft's LoRA layers of the adapted `model`, by what each adapts (`subjects.config_bridge.peft_adapters`' names).
    An adapted parameter's layer (a ``ParamWrapper``) rounds the update to the parameter's dtype and adds it there, as
    the merge does, and a DoRA layer's term is not added to the base output alone: `term_cast_first` applies to
    neither."""
    return {
        adapted_target(name, getattr(module, "parameter_name", None)): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }


def _term_cast_first(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A peft LoRA layer's output with its term rounded to the output's dtype before the addition."""
    (x,) = inputs
    down, up = module.lora_A["default"], module.lora_B["default"]
    term = up(down(x.to(down.weight.dtype))) * module.scaling["default"]
    return module.base_layer(x) + term.to(output.dtype)


def merged(case: ModelCase, dtype: torch.dtype) -> torch.nn.Module:
    """peft's ``merge_and_unload()`` of the adapted model: each weight plus its float32 update, rounded once."""
    return adapted(case, dtype).merge_and_unload()


def merged_update_first(case: ModelCase, dtype: torch.dtype) -> torch.nn.Module:
    """The merge in the other order a correct implementation may take (mlx-lm's ``fuse`` does): the update
    ``scale * B A`` rounded to the model's dtype first, then added in it; DoRA's adapted weight, so rounded, then
    scaled to its magnitudes by its row norms."""
    model = loaded(reference_directory(case), dtype)
    parameters = dict(model.named_parameters())
    magnitudes = dora_magnitudes(case)
    with torch.no_grad():
        for path, (a, b) in case.adapters.items():
            update = case.lora.scale * (torch.from_numpy(b) @ torch.from_numpy(a))
            block, key = block_and_key(path)
            if key in FUSED_EXPERTS:  # each expert's update, into its rows of transformers' parameter
                target, index = FUSED_EXPERTS[key]
                weight = parameters[case.reference_name(f"{block}.{target}")][
                    :, index * update.shape[1] : (index + 1) * update.shape[1]
                ]
            else:
                weight = parameters[case.reference_name(f"{path}.weight")]
            adapted = weight + update.to(dtype)
            if path in magnitudes:
                norms = torch.linalg.vector_norm(adapted.double(), dim=1, keepdim=True)
                adapted = torch.from_numpy(magnitudes[path]).double()[:, None] / norms * adapted.double()
            weight.copy_(adapted.to(dtype))
    return model


def adapted_modules(model: torch.nn.Module, case: ModelCase) -> set[str]:
    """The layers of mlx-lm's model that what peft adapted in `model` stands for, by mlx-lm's names."""
    return {layer for target in lora_layers(model) for layer in mlx_lm_layers_of(case, target)}


def logits(model: torch.nn.Module, case: ModelCase) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(case.tokens)).logits.to(torch.float64).numpy()


ATTENTION = ("sdpa", "eager")
"""transformers' attention implementations, two orders of one formula: ``sdpa`` keeps the scores in float32 on the
CPU, ``eager`` (as MLX's attention on the CPU) stores them in the model's dtype before the softmax, which in a model
with large activations moves the logits by far more."""


def logits_in_each_attention(model: torch.nn.Module, case: ModelCase) -> list[np.ndarray]:
    """The logits with each of `ATTENTION`'s implementations."""
    found = []
    for attention in ATTENTION:
        model.set_attn_implementation(attention)
        found.append(logits(model, case))
    return found


@once_per_case
def _oracle(case: ModelCase) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """The adapted model in float64: its logits, the largest magnitude any of its modules takes or gives, and its
    routers' logits (`recorded_routes`)."""
    largest = [0.0]

    def record(module: torch.nn.Module, inputs: tuple, output) -> None:
        for value in (*inputs, *(output if isinstance(output, tuple) else (output,))):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                largest[0] = max(largest[0], float(value.detach().abs().max()))

    with borrowed(case, torch.float64) as model:
        hooks = [module.register_forward_hook(record) for module in model.modules()]
        try:
            with recorded_routes(model) as routes:
                found = logits(model, case)
        finally:
            for hook in hooks:
                hook.remove()
    return found, largest[0], routes


def oracle_logits(case: ModelCase) -> np.ndarray:
    """The adapted model's logits in float64: what every side's rounding is measured from."""
    return _oracle(case)[0]


def oracle_largest(case: ModelCase) -> float:
    """The largest magnitude any module of the float64 model takes or gives on the case's tokens."""
    return _oracle(case)[1]


def oracle_routes(case: ModelCase) -> list[np.ndarray]:
    """The float64 adapted model's routers' logits on the case's tokens (none for a dense model)."""
    return _oracle(case)[2]


@contextlib.contextmanager
def recorded_routes(model: torch.nn.Module) -> Iterator[list[np.ndarray]]:
    """The logits (tokens, experts) of each router of a mixture (``mlp.gate``, adapted or not) that `model` runs
    while in the context, in float64, in the order computed."""
    routers = {}
    for name, module in model.named_modules():  # a peft layer before the router it wraps: the router wins
        if adapted_target(name, None).endswith(f".{ROUTER}"):
            routers[adapted_target(name, None)] = module
    found: list[np.ndarray] = []

    def record(module: torch.nn.Module, inputs: tuple, output) -> None:
        router_logits = output[0] if isinstance(output, tuple) else output
        found.append(router_logits.detach().to(torch.float64).reshape(-1, router_logits.shape[-1]).numpy())

    hooks = [module.register_forward_hook(record) for module in routers.values()]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


PERTURBATIONS = 2
"""How many perturbed float64 models `perturbed_logits` runs."""


@once_per_case
def perturbed_logits(case: ModelCase) -> list[np.ndarray]:
    """The float64 adapted model's logits with every module's floating inputs and outputs perturbed by one rounding of
    the case's dtype (`rounding_perturbed`), `PERTURBATIONS` times: what roundings do to the logits, to first order,
    in whatever order an implementation computes. Where the model amplifies an error (large adapters into a norm, a
    sum that cancels), correct implementations' errors differ by far more than where it does not, and these say how
    far."""
    found = []
    with borrowed(case, torch.float64) as model:
        for draw in range(PERTURBATIONS):
            with rounding_perturbed(model, case.dtype.unit_roundoff, case.seed + draw):
                found.append(logits(model, case))
    return found


@contextlib.contextmanager
def rounding_perturbed(model: torch.nn.Module, unit_roundoff: float, seed: int) -> Iterator[None]:
    """While in the context, every module of `model` has its floating inputs and outputs multiplied by ``1 + u e``,
    e drawn uniformly within ±1 from `seed`: one rounding each. A perturbed input stands for the roundings inside the
    module's sums (a dot product of rounded terms is one of perturbed inputs), a perturbed output for the rounding of
    its result."""
    generator = torch.Generator().manual_seed(seed)

    def rounded(value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        noise = 2 * torch.rand(value.shape, generator=generator, dtype=value.dtype) - 1
        return value * (1 + unit_roundoff * noise)

    def inputs(module: torch.nn.Module, arguments: tuple) -> tuple:
        return tuple(rounded(argument) for argument in arguments)

    def output(module: torch.nn.Module, arguments: tuple, result):
        return (rounded(result[0]), *result[1:]) if isinstance(result, tuple) else rounded(result)

    hooks = [module.register_forward_pre_hook(inputs) for module in model.modules()]
    hooks += [module.register_forward_hook(output) for module in model.modules()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@once_per_case
def base_logits(case: ModelCase) -> np.ndarray:
    """The model's logits without adapters, in float64: the oracle's less its adapters' contribution."""
    return logits(loaded(reference_directory(case), torch.float64), case)


def trained(
    case: ModelCase,
    dtype: torch.dtype,
    steps: int,
    learning_rate: float,
    term_cast_first: bool = False,
    attention: str = "sdpa",
    loss_in_dtype: bool = False,
    routes: list[np.ndarray] | None = None,
    perturbed: tuple[float, int] | None = None,
    optimizer: str = "sgd",
    quantized_in_dtype: bool = False,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """`steps` steps of torch's `optimizer` (``sgd`` or ``adam``, torch's defaults but the learning rate) on peft's
    adapted model (its base frozen by `get_peft_model`), the mean cross-entropy of each next token, as transformers
    computes it from float32 logits (or, `loss_in_dtype`, from the logits in the model's dtype, as mlx-lm does); the
    losses, and the trainable parameters after the steps by mlx-lm's names and layouts (``...q_proj.lora_a``
    (in, r)). `routes` receives the routers' logits of every step; `perturbed` (a unit roundoff and a seed) runs every
    forward pass `rounding_perturbed`; `quantized_in_dtype` sums the products of the layers MLX holds quantized in
    `dtype` (`reference.quantized_products`)."""
    with borrowed(case, dtype, term_cast_first) as model:
        model.set_attn_implementation(attention)
        model.train()
        layers = lora_layers(model)
        masked = [
            layers[target].lora_B["default"].weight.register_hook(lambda grad, mask=torch.from_numpy(mask): grad * mask)
            for target, mask in gradient_masks(case).items()
        ]
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch_optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(trainable, lr=learning_rate)
        quantized = products_in_dtype(model, case) if quantized_in_dtype else contextlib.nullcontext()
        try:
            with quantized:
                losses = _steps(model, case, steps, torch_optimizer, loss_in_dtype, routes, perturbed)
            return losses, _as_mlx_lm_parameters(case, model, layers)
        finally:
            for hook in masked:
                hook.remove()


def _steps(
    model: torch.nn.Module,
    case: ModelCase,
    steps: int,
    torch_optimizer: torch.optim.Optimizer,
    loss_in_dtype: bool,
    routes: list[np.ndarray] | None,
    perturbed: tuple[float, int] | None,
) -> list[float]:
    """`trained`'s steps on `model`: their losses."""
    tokens = torch.from_numpy(case.tokens)
    losses = []
    for step in range(steps):
        perturbing = (
            rounding_perturbed(model, perturbed[0], perturbed[1] + step) if perturbed else contextlib.nullcontext()
        )
        with recorded_routes(model) as routed, perturbing:
            logits = model(tokens[:, :-1]).logits
        if routes is not None:
            routes += routed
        logits = logits if loss_in_dtype else logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        torch_optimizer.zero_grad()
        loss.backward()
        torch_optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _as_mlx_lm_parameters(
    case: ModelCase, model: torch.nn.Module, layers: dict[str, torch.nn.Module]
) -> dict[str, np.ndarray]:
    """The trainable parameters of peft's adapted `model` by mlx-lm's names and in its layouts (``...q_proj.lora_a``
    (in, r)); any other than the adapters' factors by its name in the model peft wraps. Copies: the model is given
    back as loaded (`borrowed`)."""
    found, factors = {}, set()
    for target, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        factors |= {id(a), id(b)}
        found |= mlx_lm_adapters_of(case, target, *(f.detach().to(torch.float64, copy=True).numpy() for f in (a, b)))
        if case.dora:  # DoRA's magnitude m (out,), mlx-lm's ``m``
            magnitude = layer.lora_magnitude_vector["default"].weight
            factors.add(id(magnitude))
            found[f"{target}.m"] = magnitude.detach().to(torch.float64, copy=True).numpy()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in factors:
            found[mlx_module(name)] = parameter.detach().to(torch.float64, copy=True).numpy()
    return found
