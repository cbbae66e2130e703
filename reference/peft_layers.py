"""peft's LoRA layers built directly around a torch base layer (no PeftModel), holding a case's weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import cast_adapter_dtype

from foundation.cases import EmbeddingCase, LinearCase
from foundation.dtypes import DType
from foundation.memo import LayerRun, once_per_case
from foundation.optimizers import OptimizerSpec
from foundation.switch_cases import SwitchCase

ADAPTER = "default"


def tensor(values: np.ndarray, dtype: DType) -> torch.Tensor:
    """A torch tensor holding `values` exactly (they are representable in `dtype` by construction)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(dtype.torch)


@once_per_case
def input_of(case: LinearCase | SwitchCase) -> torch.Tensor:
    """The case's input x as a tensor, made once for the checks that call a layer on it without gradients
    (the gradient checks make their own, which they ask gradients of)."""
    return tensor(case.x, case.dtype)


def to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().to(torch.float64).numpy()


def dtype_name(values: torch.Tensor) -> str:
    return str(values.dtype).removeprefix("torch.")


def _config(case: LinearCase, r: int | None = None, dropout: float | None = None, loaded: bool = False) -> LoraConfig:
    """peft's configuration of the case; `loaded`: for a layer whose adapter is then loaded from the case, which
    peft need not initialise first (``init_lora_weights=False``: the values it would draw are overwritten)."""
    return LoraConfig(
        r=case.r if r is None else r,
        lora_alpha=case.alpha,
        use_rslora=case.use_rslora,
        lora_dropout=case.dropout if dropout is None else dropout,
        use_dora=case.use_dora,
        fan_in_fan_out=case.fan_in_fan_out,
        init_lora_weights=not loaded,
    )


def construct(
    case: LinearCase | EmbeddingCase | SwitchCase, r: int, dropout: float
) -> LoraLinear | LoraEmbedding | PerExpertLinears:
    """peft's layer created on the case's base with these arguments, as peft initialises it (eval mode).

    Experts get one ``Linear`` each (`PerExpertLinears`): ``target_parameters`` refuses any dropout,
    which would hide what peft says of the dropout's value.
    """
    if isinstance(case, SwitchCase):
        return PerExpertLinears([construct(expert, r, dropout) for expert in case.experts]).eval()
    if isinstance(case, EmbeddingCase):
        lookup = case.lookup
        base = torch.nn.Embedding(lookup.in_features, lookup.out_features, dtype=lookup.dtype.torch)
        layer = LoraEmbedding(base, ADAPTER, config=_config(lookup, r, dropout), r=r, lora_alpha=lookup.alpha)
    else:
        base = torch.nn.Linear(case.in_features, case.out_features, bias=case.has_bias, dtype=case.dtype.torch)
        layer = LoraLinear(base, ADAPTER, config=_config(case, r, dropout), r=r, lora_alpha=case.alpha)
    return layer.eval()


def lora_pair(layer: LoraLinear | LoraEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A (r, in) and B (out, r) parameters, whichever layer holds them."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[ADAPTER], layer.lora_embedding_B[ADAPTER]
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def _load(layer: LoraLinear | LoraEmbedding, case: LinearCase) -> None:
    """Give the layer the case's adapter. A float32 adapter on a half-precision base is upcast first, as
    ``get_peft_model`` and ``PeftModel`` do by default (``autocast_adapter_dtype=True``); peft creates its
    layers' adapters in the base's dtype, which is the configuration without it."""
    if case.mixed:
        cast_adapter_dtype(layer, ADAPTER, autocast_adapter_dtype=True)
    lora_A, lora_B = lora_pair(layer)
    with torch.no_grad():
        lora_A.copy_(tensor(case.lora_A, case.adapter_dtype))
        lora_B.copy_(tensor(case.lora_B, case.adapter_dtype))
        if case.use_dora:
            layer.lora_magnitude_vector[ADAPTER].weight.copy_(tensor(case.magnitude, case.adapter_dtype))
    layer.eval()


def _base(case: LinearCase) -> torch.nn.Module:
    """The torch base: ``nn.Linear``, or with `fan_in_fan_out` a transformers ``Conv1D`` (weight (in, out),
    always with a bias, zero where the case has none)."""
    if not case.fan_in_fan_out:
        return torch.nn.Linear(case.in_features, case.out_features, bias=case.has_bias, dtype=case.dtype.torch)
    from transformers.pytorch_utils import Conv1D

    return Conv1D(case.out_features, case.in_features).to(case.dtype.torch)


def base_weight(layer: LoraLinear, case: LinearCase) -> torch.Tensor:
    """The (merged) base weight in ``nn.Linear``'s (out, in) layout."""
    weight = layer.get_base_layer().weight
    return weight.T if case.fan_in_fan_out else weight


def linear(case: LinearCase) -> LoraLinear:
    """peft's LoRA ``Linear`` for the case (``fan_in_fan_out`` on a Conv1D base), in eval mode."""
    base = _base(case)
    layer = LoraLinear(base, ADAPTER, config=_config(case, loaded=True), r=case.r, lora_alpha=case.alpha)
    with torch.no_grad():
        weight = tensor(case.weight, case.dtype)
        base.weight.copy_(weight.T if case.fan_in_fan_out else weight)
        if case.has_bias:
            base.bias.copy_(tensor(case.bias, case.dtype))
        elif case.fan_in_fan_out:
            base.bias.zero_()
    _load(layer, case)
    return layer


def embedding(case: EmbeddingCase) -> LoraEmbedding:
    """peft's LoRA ``Embedding`` for the case, in eval mode."""
    lookup = case.lookup
    base = torch.nn.Embedding(lookup.in_features, lookup.out_features, dtype=lookup.dtype.torch)
    layer = LoraEmbedding(base, ADAPTER, config=_config(lookup, loaded=True), r=lookup.r, lora_alpha=lookup.alpha)
    with torch.no_grad():
        base.weight.copy_(tensor(case.weight, case.dtype))
    _load(layer, lookup)
    return layer


def _merged(layer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # merging is no training step: nothing asks its gradient
        layer.merge()
    return layer


@once_per_case
def run(case: LinearCase | EmbeddingCase | SwitchCase) -> LayerRun:
    """peft's layer for the case (`linear`, `embedding` or `switch`), shared by the checks that only call it
    or merge it (`foundation.memo.LayerRun`)."""
    return LayerRun(case, {EmbeddingCase: embedding, SwitchCase: switch}.get(type(case), linear), _merged)


def lookup(layer: LoraEmbedding, case: EmbeddingCase) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.tensor(case.ids))


def dora_magnitude_at_creation(case: LinearCase | EmbeddingCase, with_adapter: bool) -> torch.Tensor:
    """The magnitude peft derives when it creates a DoRA layer on the case's base.

    Without the adapter, B is zero as peft initialises it; with it, the case's A and B are in place
    when peft derives the magnitude, as when a layer is created with ``init_lora_weights=False``.
    """
    layer = embedding(case) if isinstance(case, EmbeddingCase) else linear(case)
    dora = layer.lora_magnitude_vector[ADAPTER]
    lora_A, lora_B = lora_pair(layer)
    with torch.no_grad():
        if not with_adapter:
            lora_B.zero_()
        dora.update_layer(
            base_layer=layer.get_base_layer(), lora_A=lora_A, lora_B=lora_B, scaling=layer.scaling[ADAPTER]
        )
    return dora.weight


def _call(layer: torch.nn.Module, case: LinearCase, x: torch.Tensor) -> torch.Tensor:
    if case.use_dora and x.ndim == 1:
        # peft's DoRA views its factor as (1, out), which turns an unbatched (in,) input into a
        # (1, out) output (tests/test_reference.py pins this down); give it a batch of one.
        return layer(x[None])[0]
    return layer(x)


def forward(layer: torch.nn.Module, case: LinearCase) -> torch.Tensor:
    with torch.no_grad():
        return _call(layer, case, input_of(case))


class InjectedDropout(torch.nn.Module):
    """torch's dropout arithmetic with a given keep-mask (a function of the input's shape):
    `bridge.InjectedDropout`'s twin."""

    def __init__(self, p: float, mask: Callable[[tuple[int, ...]], np.ndarray]):
        super().__init__()
        self.p, self.mask = p, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.from_numpy(self.mask(tuple(x.shape))).to(x.dtype)) * (1 / (1 - self.p))


def trained_with_mask(
    layer: LoraLinear | LoraEmbedding, mask: Callable[[tuple[int, ...]], np.ndarray], p: float
) -> torch.nn.Module:
    """peft's layer in training mode, its LoRA dropout replaced by an `InjectedDropout` with `mask`."""
    layer.lora_dropout[ADAPTER] = InjectedDropout(p, mask)
    return layer.train()


# Mixture of experts ----------------------------------------------------------------------------


class Experts(torch.nn.Module):
    """A mixture-of-experts projection as transformers models store one: ``weight`` (experts, out, in),
    ``bias`` (experts, out). Each token goes through the k experts its indices name: (*batch, k, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        routed = self.weight[indices]  # (*batch, k, out, in)
        output = (routed @ x[..., None, :, None]).squeeze(-1)
        return output if self.bias is None else output + self.bias[indices]


class PerExpertLinears(torch.nn.Module):
    """One peft LoRA ``Linear`` per expert, routed like `Experts`: for what ``target_parameters`` refuses."""

    def __init__(self, experts: list[LoraLinear]) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        every = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (*batch, E, out)
        return torch.take_along_dim(every, indices[..., None], dim=-2)

    def merge(self) -> None:
        for expert in self.experts:
            expert.merge()

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bases = [expert.get_base_layer() for expert in self.experts]
        biases = [base.bias for base in bases]
        return torch.stack([base.weight for base in bases]), None if biases[0] is None else torch.stack(biases)


def uses_target_parameters(case: SwitchCase) -> bool:
    """Whether peft's ``target_parameters`` can express the case: it refuses dropout (eval mode or not)."""
    return case.first.dropout == 0.0


def switch(case: SwitchCase) -> torch.nn.Module:
    """peft's LoRA on the experts' weight (``LoraConfig(target_parameters=...)``'s ``ParamWrapper``), in
    eval mode; where peft refuses the case, one peft ``Linear`` per expert (`PerExpertLinears`)."""
    if not uses_target_parameters(case):
        return PerExpertLinears([linear(expert) for expert in case.experts]).eval()
    first, dtype = case.first, case.dtype
    bias = tensor(case.stacked("bias"), dtype) if first.has_bias else None
    base = Experts(tensor(case.stacked("weight"), dtype), bias)
    config = _config(first, loaded=True)
    layer = ParamWrapper(base, ADAPTER, parameter_name="weight", config=config, r=first.r, lora_alpha=first.alpha)
    E, r, adapter_dtype = case.num_experts, first.r, first.adapter_dtype
    if first.mixed:
        cast_adapter_dtype(layer, ADAPTER, autocast_adapter_dtype=True)
    with torch.no_grad():
        # peft's layouts: A (E r, in), expert-major; B (out, r E), expert-minor (see get_delta_weight).
        layer.lora_A[ADAPTER].weight.copy_(tensor(case.stacked("lora_A").reshape(E * r, -1), adapter_dtype))
        b = case.stacked("lora_B").transpose(1, 2, 0).reshape(first.out_features, r * E)  # from (E, out, r)
        layer.lora_B[ADAPTER].weight.copy_(tensor(b, adapter_dtype))
    return layer.eval()


def switch_forward(layer: torch.nn.Module, case: SwitchCase) -> torch.Tensor:
    with torch.no_grad():
        return layer(input_of(case), torch.from_numpy(case.indices.astype(np.int64)))


def switch_merged_parameters(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merged experts' weight (E, out, in) and bias (E, out) or None."""
    if isinstance(layer, PerExpertLinears):
        return layer.merged_parameters()
    base = layer.get_base_layer()
    return base.weight, base.bias


# Gradients --------------------------------------------------------------------------------------

ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "m"}
"""peft's parameter names (their first component) -> the roles the gradient checks compare."""


def role(name: str) -> str:
    """The role of one of peft's parameters: "A", "B", "m", "bias" (the base's), or its own name."""
    parts = name.split(".")
    found = next((ROLES[part] for part in parts if part in ROLES), None)
    return found or ("bias" if parts[-1] == "bias" else name)


def grads(
    case: LinearCase | EmbeddingCase, upstream: np.ndarray, bias_trains: bool = False
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """torch autograd of ``sum(y * T)`` through peft's layer, with the base frozen as ``PeftModel`` leaves it
    (``bias="none"``; with `bias_trains`, ``bias="all"``: the base bias trains): the gradients by role
    (and "x" for a linear layer), and the roles of the trainable parameters."""
    layer = embedding(case) if isinstance(case, EmbeddingCase) else linear(case)
    base = layer.get_base_layer()
    base.requires_grad_(False)
    if bias_trains and getattr(base, "bias", None) is not None:
        base.bias.requires_grad_(True)
    if isinstance(case, EmbeddingCase):
        x = None
        output = layer(torch.tensor(case.ids))
    else:
        x = tensor(case.x, case.dtype).requires_grad_(True)
        output = _call(layer, case, x)
    (output * tensor(upstream, case.dtype)).sum().backward()
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    found = {f"grad {role(name)}": p.grad for name, p in trainable.items() if p.grad is not None}
    if x is not None:
        found["grad x"] = x.grad
    return found, {role(name) for name in trainable}


# Optimizer steps --------------------------------------------------------------------------------


def training_steps(
    case: LinearCase | EmbeddingCase, spec: OptimizerSpec, target: np.ndarray, count: int
) -> list[dict[str, torch.Tensor]]:
    """peft's A and B after each of `count` torch SGD / AdamW steps on ``1/2 sum((y - Y)^2)``, base frozen,
    in eval mode (no dropout)."""
    looks_up = isinstance(case, EmbeddingCase)
    layer = embedding(case) if looks_up else linear(case)
    layer.get_base_layer().requires_grad_(False)
    parameters = [p for p in layer.parameters() if p.requires_grad]
    if spec.kind == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=spec.lr)
    else:
        optimizer = torch.optim.AdamW(
            parameters, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay
        )
    y_target = tensor(target, case.dtype)
    ids, x = (torch.tensor(case.ids), None) if looks_up else (None, tensor(case.x, case.dtype))
    trajectory = []
    for _ in range(count):
        optimizer.zero_grad()
        output = layer(ids) if looks_up else _call(layer, case, x)
        (0.5 * ((output - y_target) ** 2).sum()).backward()
        optimizer.step()
        lora_A, lora_B = lora_pair(layer)
        trajectory.append({"A": lora_A.detach().clone(), "B": lora_B.detach().clone()})
    return trajectory


def switch_grads(case: SwitchCase, upstream: np.ndarray) -> tuple[dict[str, torch.Tensor], set[str]]:
    """torch autograd of ``sum(y * T)`` through peft's switch reference (base frozen): A's and B's gradients
    stacked per expert, (E, r, in) and (E, out, r), x's, and the roles of the trainable parameters."""
    layer = switch(case)
    if isinstance(layer, PerExpertLinears):
        for expert in layer.experts:
            expert.get_base_layer().requires_grad_(False)
    x = tensor(case.x, case.dtype).requires_grad_(True)
    output = layer(x, torch.from_numpy(case.indices.astype(np.int64)))
    (output * tensor(upstream, case.dtype)).sum().backward()
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    if isinstance(layer, PerExpertLinears):
        pairs = [lora_pair(expert) for expert in layer.experts]
        grad_a, grad_b = torch.stack([a.grad for a, _ in pairs]), torch.stack([b.grad for _, b in pairs])
    else:  # peft's layouts: A (E r, in), expert-major; B (out, r E), expert-minor
        E, r, out = case.num_experts, case.first.r, case.first.out_features
        grad_a = layer.lora_A[ADAPTER].weight.grad.reshape(E, r, -1)
        grad_b = layer.lora_B[ADAPTER].weight.grad.reshape(out, r, E).permute(2, 0, 1)
    return {"grad A": grad_a, "grad B": grad_b, "grad x": x.grad}, {role(name) for name in trainable}
