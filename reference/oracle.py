"""The oracle: the LoRA and rsLoRA formulas evaluated in float64 from the case's own weights.

Each formula is spelled out in the evaluation order a straightforward implementation uses, on
`Tracked` values, so evaluating it yields both the exact result and the error that rounding in the
case dtype can explain (see `foundation.verdict`).
"""

from __future__ import annotations

import numpy as np

from foundation.cases import EmbeddingCase, LinearCase
from foundation.dtypes import ACCUMULATION, DType
from foundation.memo import once_per_case
from foundation.switch_cases import SwitchCase
from foundation.verdict import Tracked
from foundation.weights import adapted_sum, adapted_weight, adapter, base_weight, exact, lora_delta
from subjects import kernels


def _affine(case: LinearCase, weight: Tracked, accumulation: DType = ACCUMULATION) -> Tracked:
    """``x W^T + b``: the product, then the bias; or, as BLAS's ``addmm`` (torch's Linear and Conv1D)
    does, one sum of n + 1 terms that starts from the bias. The bound covers both."""
    x = exact(case, case.x)
    if not case.has_bias:
        return x.matmul(weight.T, accumulation)
    return x.affine(weight.T, exact(case, case.bias), accumulation)


def _accumulates_in_dtype(case: LinearCase) -> bool:
    """Whether the base's product may accumulate more coarsely than in float32: a quantized base in half precision."""
    return case.quantization is not None and case.dtype.unit_roundoff > ACCUMULATION.unit_roundoff


@once_per_case
def linear_base(case: LinearCase) -> Tracked:
    """``x W^T + b``: the frozen base layer alone.

    A quantized base's own matrix product may accumulate in the case dtype (MLX's CPU kernels do:
    ``test_quantized_linear.py::test_quantized_matmul_accumulation`` judges that op by itself), so
    that the LoRA checks judge the LoRA layer and not its base. The worst case of such a sum is loose,
    in bfloat16 infinite from 256 terms; the bound is narrowed to what MLX's quantized base itself is off
    by on this x (`Tracked.narrowed_to`), and covers float32 accumulation (a layer that dequantizes, and
    peft) as well. Where every row of x has at most one nonzero element (an embedding's one-hot lookup),
    each sum has one term, which no accumulation rounds: float32's bound covers it.
    """
    weight = base_weight(case)
    in_float32 = _affine(case, weight)
    if not _accumulates_in_dtype(case) or np.count_nonzero(case.x, axis=-1).max(initial=0) <= 1:
        return in_float32
    observed = kernels.quantized_base_output(case)
    return _affine(case, weight, case.dtype).narrowed_to(observed, in_float32)


def _base_input_gradient(case: LinearCase, t: Tracked, weight: Tracked, upstream: np.ndarray) -> Tracked:
    """``T W``, (N, in): the base's share of x's gradient; for a quantized base narrowed, as in `linear_base`,
    to what MLX's own backward of that base (the quantized product with the untransposed weight) is off by."""
    in_float32 = t.matmul(weight)
    if not _accumulates_in_dtype(case):
        return in_float32
    observed = kernels.quantized_base_input_gradient(case, upstream).reshape(in_float32.value.shape)
    return t.matmul(weight, case.dtype).narrowed_to(observed, in_float32)


def lora_update(case: LinearCase, lora_input: Tracked | None = None) -> Tracked:
    """``s (x A^T) B^T``: the LoRA term (of `lora_input`, the dropped-out input, where given)."""
    return _eval_lora_update(case) if lora_input is None else _lora_update(case, lora_input)


@once_per_case
def _eval_lora_update(case: LinearCase) -> Tracked:
    return _lora_update(case, None)


def _lora_update(case: LinearCase, lora_input: Tracked | None) -> Tracked:
    down = (exact(case, case.x) if lora_input is None else lora_input) @ adapter(case, case.lora_A).T
    return down.scaled_matmul(adapter(case, case.lora_B).T, case.scale)


def dropped_input(case: LinearCase, mask: np.ndarray) -> Tracked:
    """Inverted dropout of x with a given keep-mask: ``(x * mask) * (1 / (1 - p))``; before a float32 adapter,
    in x's dtype (MLX drops x, then promotes it) or in float32 (peft casts x to the adapter's dtype first)."""
    kept = exact(case, case.x * mask)
    dropped = kept.scaled(1 / (1 - case.dropout))
    if not case.mixed:
        return dropped
    return Tracked.covering(
        dropped.cast(case.adapter_dtype), kept.cast(case.adapter_dtype).scaled(1 / (1 - case.dropout))
    )


@once_per_case
def dora_factor(case: LinearCase) -> Tracked:
    """DoRA's per-output factor ``m / ||W + s B A||`` (row norms over the input dimension), (out,)."""
    return adapter(case, case.magnitude) / adapted_sum(case).row_norm()


@once_per_case
def magnitude_at_init(case: LinearCase) -> Tracked:
    """The magnitude DoRA starts from when B is zero: the base weight's row norms."""
    return base_weight(case).row_norm()


def linear_forward(case: LinearCase, dropped: Tracked | None = None) -> Tracked:
    """LoRA (Hu et al. 2021; rsLoRA: s = alpha / sqrt(r)): ``y = x W^T + b + s (x A^T) B^T``.

    DoRA (Liu et al. 2024): ``y = m / ||W + s B A|| * (x W^T + s (x A^T) B^T) + b``.

    In training mode, with `dropped` the dropped-out input x': LoRA's term is ``s (x' A^T) B^T``, and
    DoRA's is peft's ``x W^T + b + (f - 1) x' W^T + f s (x' A^T) B^T`` (``f = m / ||W + s B A||``): the
    base layer sees x, the magnitude's correction and the adapter see x'.
    """
    return _eval_forward(case) if dropped is None else _forward(case, dropped)


@once_per_case
def _eval_forward(case: LinearCase) -> Tracked:
    return _forward(case, None)


def _bias_term(case: LinearCase) -> dict[str, np.ndarray]:
    return {"bias": case.bias} if case.has_bias else {}


def _forward(case: LinearCase, dropped: Tracked | None) -> Tracked:
    if not case.use_dora:
        lora = lora_update(case, dropped)
        base = linear_base(case)
        terms = {"LoRA term": lora.value, "base term": base.value - (case.bias if case.has_bias else 0)}
        return base.plus(lora).with_terms({**terms, **_bias_term(case)})
    return _dora_forward(case, dropped)


def _dora_forward(case: LinearCase, dropped: Tracked | None) -> Tracked:
    """DoRA's `_forward`, with its terms: the LoRA term ``f s (x' A^T) B^T``, the rest of the base's, the bias and
    (in eval mode) the magnitude's ``f (x W^T + s (x A^T) B^T)``."""
    result = _dora_output(case, dropped)
    factor, x = dora_factor(case).value, exact(case, case.x) if dropped is None else dropped
    lora = factor * (x.value @ case.lora_A.T @ case.lora_B.T) * case.scale
    bias = case.bias if case.has_bias else 0
    terms = {"LoRA term": lora, "base term": result.value - bias - lora, **_bias_term(case)}
    if dropped is None:
        terms["magnitude"] = result.value - bias
    return result.with_terms(terms)


def _dora_output(case: LinearCase, dropped: Tracked | None) -> Tracked:
    factor, unbiased = dora_factor(case), exact(case, case.x) @ base_weight(case).T
    down, up = (
        (exact(case, case.x) if dropped is None else dropped) @ adapter(case, case.lora_A).T,
        adapter(case, case.lora_B).T,
    )
    lora = down.scaled_matmul(up, case.scale)
    # peft scales last, (f ((x' A^T) B^T)) s: f times the unscaled term may sink into the subnormals
    # before s magnifies that underflow.
    scaled_lora = Tracked.covering(factor * lora, (factor * (down @ up)).scaled(case.scale))
    one = Tracked.exact(np.ones_like(factor.value), case.dtype)
    if dropped is not None:
        correction = (factor - one) * (dropped @ base_weight(case).T)
        return linear_base(case).plus(correction + scaled_lora)
    # MLX scales the sum; peft adds (factor - 1) * base + factor * lora to the base layer's output.
    # When the factor is far from 1 the two round quite differently, so the bound covers both. With a
    # float32 adapter, MLX casts the factor and the LoRA term to the output's dtype; peft's correction is
    # float32, added to the base's output and the sum cast (`Tracked.plus`).
    scaled_sum = factor.cast(case.dtype) * unbiased.plus(lora)
    less_one = factor - one
    correction = less_one * unbiased + scaled_lora
    if case.has_bias:
        bias = exact(case, case.bias)
        # peft's base layer is torch's addmm, which may fold the bias into the sum (`linear_base`), and DoRA
        # takes the bias off that output again: its correction carries the rounding of x W^T + b.
        base = linear_base(case)
        peft = base.plus(less_one * (base - bias) + scaled_lora)
        return Tracked.covering(scaled_sum + bias, (unbiased + bias).plus(correction), peft)
    return Tracked.covering(scaled_sum, unbiased.plus(correction))


@once_per_case
def merged_weight(case: LinearCase) -> Tracked:
    """LoRA: ``W + s B A``; DoRA: ``m / ||W + s B A|| * (W + s B A)``; (out, in), in the base's dtype.

    With a float32 adapter, peft scales the float32 sum and casts the product once; MLX adds the update cast to
    the base's dtype, and normalises that. The bound covers both."""
    update, weight = lora_delta(case).value, base_weight(case).value
    if not case.use_dora:
        return adapted_weight(case).with_terms({"LoRA term": update, "base term": weight})
    merged = dora_factor(case)[:, None] * adapted_sum(case)
    if case.mixed:
        adapted = adapted_weight(case)
        in_base_dtype = (adapter(case, case.magnitude) / adapted.row_norm())[:, None] * adapted
        merged = Tracked.covering(merged.cast(case.dtype), in_base_dtype.cast(case.dtype))
    factor = dora_factor(case).value[:, None]
    return merged.with_terms({"LoRA term": factor * update, "base term": factor * weight, "magnitude": merged.value})


@once_per_case
def merged_forward(case: LinearCase) -> Tracked:
    """The merged layer's output ``x (W + s B A)^T + b``."""
    weight = merged_weight(case)
    terms = {name: case.x @ term.T for name, term in weight.terms.items() if name != "magnitude"}
    if case.use_dora:
        terms["magnitude"] = case.x @ weight.value.T
    return _affine(case, weight).with_terms({**terms, **_bias_term(case)})


@once_per_case
def embedding_forward(case: EmbeddingCase) -> Tracked:
    """``W[ids] + s A^T[ids] B^T`` — the lookup as the linear map it is (DoRA: per embedding dimension)."""
    return linear_forward(case.lookup)


@once_per_case
def embedding_merged_weight(case: EmbeddingCase) -> Tracked:
    """The merged table, (vocabulary, dims)."""
    return merged_weight(case.lookup).T


@once_per_case
def embedding_as_linear(case: EmbeddingCase) -> Tracked:
    """``hidden @ merged table^T``: the tied output head, (*batch, vocabulary).

    LoRA may be evaluated merged or as ``hidden W^T + s (hidden B) A``; the bound covers both.
    """
    merged = Tracked.exact(case.hidden, case.dtype) @ merged_weight(case.lookup)
    return merged if case.lookup.use_dora else Tracked.covering(merged, linear_forward(case.head))


@once_per_case
def embedding_rows_merged_weight(case: EmbeddingCase) -> Tracked:
    """MLX's DoRA embedding merged (`EmbeddingCase.per_row`): each adapted row ``W[v] + s A^T[v] B^T`` times
    ``m[v] / ||W[v] + s A^T[v] B^T||``, (vocabulary, dims)."""
    return merged_weight(case.per_row)


def embedding_rows_forward(case: EmbeddingCase) -> Tracked:
    """MLX's DoRA embedding's lookups: the merged rows of the token ids."""
    return embedding_rows_merged_weight(case)[case.ids]


def embedding_rows_as_linear(case: EmbeddingCase) -> Tracked:
    """MLX's DoRA embedding's ``as_linear``: ``m / ||W + s A^T B^T||_rows * hidden (W + s A^T B^T)^T``."""
    return linear_forward(case.per_row)


def _routed(case: SwitchCase, per_expert: list[Tracked]) -> Tracked:
    """Each token's results from its k experts, (*batch, k, out), from every expert's (*batch, out)."""
    every = Tracked.stack(per_expert, axis=-2)
    return every.take_along_axis(case.indices[..., None].astype(np.intp), axis=-2)


@once_per_case
def adapted_expert_weight(expert: LinearCase) -> Tracked:
    """``W_e + s B_e A_e`` as peft's ``target_parameters`` forms it on every forward: one ``baddbmm``, which
    BLAS may evaluate as a single sum of r + 1 terms that starts from W_e (each term s b a, s rounded into B
    first), or as the product, scaled, then added (`adapted_weight`). The bound covers both. A float32 adapter's
    update is formed in float32 and cast to the weight's dtype before it is added: no one sum."""
    if expert.mixed:
        return adapted_weight(expert)
    b, a = adapter(expert, expert.lora_B), adapter(expert, expert.lora_A)
    folded = b.scaled(expert.scale).matmul_onto(base_weight(expert), a)
    return Tracked.covering(adapted_weight(expert), folded)


@once_per_case
def switch_forward(case: SwitchCase) -> Tracked:
    """Each routed expert's LoRA output: ``x W_e^T + b_e + s (x A_e^T) B_e^T`` for e in the token's indices.

    MLX evaluates the LoRA term on the input side; peft's ``target_parameters`` adapts the expert
    weight itself, ``x (W_e + s B_e A_e)^T + b_e``. The bound covers both orders.
    """
    return _routed(
        case, [Tracked.covering(linear_forward(e), _affine(e, adapted_expert_weight(e))) for e in case.experts]
    )


@once_per_case
def switch_merged_weight(case: SwitchCase) -> Tracked:
    """``W_e + s B_e A_e`` for every expert, (E, out, in)."""
    return Tracked.stack([merged_weight(e) for e in case.experts])


@once_per_case
def switch_merged_forward(case: SwitchCase) -> Tracked:
    """The merged layer's routed outputs ``x (W_e + s B_e A_e)^T + b_e``, (*batch, k, out)."""
    return _routed(case, [merged_forward(e) for e in case.experts])


def _column_sums(values: Tracked) -> Tracked:
    """The sum over the rows, (N, k) -> (k,), in the dtype: the reduction a broadcast's gradient is."""
    ones = Tracked.exact(np.ones((1, values.value.shape[0])), values.dtype)
    return ones.matmul(values, values.dtype)[0]


def linear_grads(case: LinearCase, upstream: np.ndarray, bias_trains: bool = False) -> dict[str, Tracked]:
    """Gradients of ``sum(y * T)``: with the batch flattened to N rows, for LoRA

    ``dx = T W + s (T B) A``, ``dA = s (T B)^T x`` (r, in) and ``dB = s T^T (x A^T)`` (out, r), in peft's
    layouts; with `bias_trains` (peft's ``bias="all"``) also ``db = sum_rows(T)``. The sums over the batch
    are products with inner dimension N. Autodiff through ``s * lora(x)`` scales T first (rounded to the
    dtype) and carries it through the products; an implementation may also scale last. The bound
    covers both.

    DoRA's factor ``f = m / ||W + s B A||`` is a constant to the gradient (the norm is detached, as the
    paper and peft say): T becomes ``T f`` in the LoRA gradients, and
    ``dm = sum_rows(T (x W^T + s (x A^T) B^T)) / ||W + s B A||``.
    """
    x = exact(case, case.x.reshape(-1, case.in_features))
    t = exact(case, upstream.reshape(-1, case.out_features))
    a, b, s, weight = adapter(case, case.lora_A), adapter(case, case.lora_B), case.scale, base_weight(case)
    grads: dict[str, Tracked] = {}
    if case.use_dora:
        # A quantized base's own product may accumulate in the dtype, as in `linear_base`; here its input, T f,
        # is the layer's own rounded result, so no kernel can be run on it: the worst case stays.
        accumulation = case.dtype if _accumulates_in_dtype(case) else ACCUMULATION
        factor = dora_factor(case)
        # MLX scales the sum by the factor cast to the output's dtype: T f in that dtype goes through W and the
        # adapter. peft adds (f - 1) times the base layer's own output (less its bias) to that output, so
        # T + T (f - 1) goes through W, or each part on its own; its adapter's share is T f in the adapter's
        # dtype. (With a float32 adapter, T reaches peft's float32 correction in float32, exactly.)
        unscaled_t = t
        t = unscaled_t * factor.cast(case.dtype)
        t_in_adapter_dtype = unscaled_t.cast(case.adapter_dtype)
        correction = t_in_adapter_dtype * (factor - Tracked.exact(np.ones_like(factor.value), case.dtype))
        base_dx = Tracked.covering(
            t.matmul(weight, accumulation),
            unscaled_t.plus(correction).matmul(weight, accumulation),
            unscaled_t.matmul(weight, accumulation).plus(correction.matmul(weight, accumulation)),
        )
        unbiased, down = x @ weight.T, x @ a.T
        if case.has_bias:
            bias = exact(case, case.bias)
            unbiased = Tracked.covering(unbiased, _affine(case, weight).reshape(-1, case.out_features) - bias)
        lora, unscaled_lora = down.scaled_matmul(b.T, s), down @ b.T
        norm = adapted_sum(case).row_norm()
        in_adapter_dtype = _column_sums(t_in_adapter_dtype * unbiased) + _column_sums(
            t_in_adapter_dtype.scaled(s) * unscaled_lora
        )
        grads["grad m"] = Tracked.covering(
            _column_sums(unscaled_t * unbiased.plus(lora)).cast(norm.dtype) / norm, in_adapter_dtype / norm
        )
    else:
        base_dx = _base_input_gradient(case, t, weight, upstream)
    if case.use_dora and case.mixed:  # peft's adapter sees T f in float32
        t_peft = t_in_adapter_dtype * factor
        lora_mlx, lora_peft = lora_backward(x, t, a, b, s), lora_backward(x, t_peft, a, b, s)
        lora = {name: Tracked.covering(lora_mlx[name], lora_peft[name]) for name in lora_mlx}
    else:
        lora = lora_backward(x, t, a, b, s)
    # x's gradient through a float32 adapter comes back in x's dtype and adds to the base's share there.
    grad_x = base_dx.plus(lora["x"]).with_terms({"LoRA term": lora["x"].value, "base term": base_dx.value})
    grads["grad x"] = grad_x.reshape(*case.x.shape)
    grads["grad A"], grads["grad B"] = lora["A"], lora["B"]
    if case.use_dora:
        grads["grad m"] = grads["grad m"].with_terms({"magnitude": grads["grad m"].value})
    if bias_trains and case.has_bias:
        grads["grad bias"] = _column_sums(exact(case, upstream.reshape(-1, case.out_features)))
        if case.use_dora:  # peft's bias also enters (f - 1) (x W^T + b - b): its gradient is T + T (f - 1) - T (f - 1)
            in_dtype = correction.cast(case.dtype)
            grads["grad bias"] = Tracked.covering(
                grads["grad bias"], _column_sums(unscaled_t.plus(correction)) - _column_sums(in_dtype)
            )
        grads["grad bias"] = grads["grad bias"].with_terms({"bias": grads["grad bias"].value})
    return grads


def lora_backward(x: Tracked, t: Tracked, a: Tracked, b: Tracked, s: float) -> dict[str, Tracked]:
    """The LoRA term's gradients of ``sum(y * T)`` for x (N, in), T (N, out), A (r, in), B (out, r):
    ``dx = s (T B) A``, ``dA = s (T B)^T x``, ``dB = s T^T (x A^T)``, T scaled first or last; or, for a layer
    that forms the update ``s B A`` as a weight first, through the weight's gradient ``T^T x`` (out, in). T reaches
    a float32 adapter through the cast of its term to the output's dtype: in float32, exactly."""
    t = t.cast(b.dtype)
    scaled_t = t.scaled(s)
    back, scaled_back = t @ b, scaled_t @ b  # (N, r)
    down = x @ a.T
    delta, weight_grad = b.scaled_matmul(a, s), t.T @ x
    grads = {
        "x": Tracked.covering(scaled_back @ a, back.scaled_matmul(a, s), t @ delta),
        "A": Tracked.covering(scaled_back.T @ x, back.T.scaled_matmul(x, s), b.T.scaled_matmul(weight_grad, s)),
        "B": Tracked.covering(scaled_t.T @ down, t.T.scaled_matmul(down, s), weight_grad.scaled_matmul(a.T, s)),
    }
    return {name: grad.with_terms({"LoRA term": grad.value}) for name, grad in grads.items()}


def embedding_grads(case: EmbeddingCase, upstream: np.ndarray) -> dict[str, Tracked]:
    """The gradients of a lookup's A and B: the linear map's, whose input (one-hot ids) has no gradient;
    A's may also be the scatter-add of each token's row gradient, in the adapter's dtype (T reaches a float32
    adapter in float32, exactly, as in `lora_backward`)."""
    lookup = case.lookup
    grads = linear_grads(lookup, upstream)
    del grads["grad x"]
    # A's rows are gathered by id: each token's row gradient is stored, then scatter-added.
    t = exact(lookup, upstream.reshape(-1, lookup.out_features)).cast(lookup.adapter_dtype)
    one_hot = exact(lookup, lookup.x.reshape(-1, lookup.in_features))
    row_grads = t.scaled(lookup.scale) @ adapter(lookup, lookup.lora_B)
    gathered = row_grads.T.matmul_of_stored_terms(one_hot, lookup.adapter_dtype)
    grads["grad A"] = Tracked.covering(grads["grad A"], gathered)
    return grads


def switch_grads(case: SwitchCase, upstream: np.ndarray) -> dict[str, Tracked]:
    """Gradients of ``sum(y * T)`` for a switch layer, T (*batch, k, out): expert e's A and B see the
    (token, slot) pairs routed to it (T zero elsewhere: top-k experts are distinct, so at most one slot
    per token), stacked (E, r, in) and (E, out, r); x's gradient sums its experts' ``T_e W_e + s (T_e B_e) A_e``
    or, merged first, ``T_e (W_e + s B_e A_e)``."""
    first = case.first
    x = Tracked.exact(case.x.reshape(-1, first.in_features), case.dtype)
    t = upstream.reshape(-1, case.top_k, first.out_features)
    indices = case.indices.reshape(-1, case.top_k)
    grads_a, grads_b, grad_x = [], [], None
    for e, expert in enumerate(case.experts):
        routed = Tracked.exact(np.sum(t * (indices == e)[..., None], axis=1), case.dtype)
        a, b = adapter(expert, expert.lora_A), adapter(expert, expert.lora_B)
        lora = lora_backward(x, routed, a, b, expert.scale)
        # A layer that gathers each token's A_e and B_e (or, as peft's target_parameters, each token's
        # merged W_e) gets each token's gradient in the dtype (the adapter's) and scatter-adds them there.
        adapter_dtype = expert.adapter_dtype
        scaled = routed.cast(adapter_dtype).scaled(expert.scale)
        weight_grad = routed.T.matmul_of_stored_terms(x, case.dtype)
        gathered_a = (scaled @ b).T.matmul_of_stored_terms(x, adapter_dtype)
        gathered_b = scaled.T.matmul_of_stored_terms(x @ a.T, adapter_dtype)
        merged_a, merged_b = b.T.scaled_matmul(weight_grad, expert.scale), weight_grad.scaled_matmul(a.T, expert.scale)
        grads_a.append(Tracked.covering(lora["A"], gathered_a, merged_a))
        grads_b.append(Tracked.covering(lora["B"], gathered_b, merged_b))
        # peft's target_parameters merges first: x's gradient then goes through W_e + s B_e A_e.
        base = routed @ base_weight(expert)
        part = Tracked.covering(base.plus(lora["x"]), routed @ adapted_expert_weight(expert))
        part = part.with_terms({"LoRA term": lora["x"].value, "base term": base.value})
        if grad_x is not None:
            terms = {name: grad_x.terms[name] + part.terms[name] for name in part.terms}
            part = (grad_x + part).with_terms(terms)
        grad_x = part
    return {
        "grad A": Tracked.stack(grads_a),
        "grad B": Tracked.stack(grads_b),
        "grad x": grad_x.reshape(*case.x.shape),
    }
