"""Standalone reproduction scripts for failing cases: only mlx, the subject's package, torch, peft and numpy.

A script holds the case's arrays (rebuilt from the recorded description, which fixes them through
its seed), builds the MLX layer as its package does and peft's layer in float64, and exits 1 when
they disagree beyond the recorded allowed error. It is written for `forward` and `merge` of LoRA and
DoRA on a float ``nn.Linear`` and of LoRA on ``nn.Embedding``, and for the gradients (``grad``,
``grad_bias_all``) of the Linear ones; every other failure replays with ``python -m conformance.replay``
(needs this suite), which `replay_command` gives.
"""

from __future__ import annotations

import base64
import math
from functools import cache
from pathlib import Path

import jinja2
import numpy as np

from foundation import schema
from foundation.schema import CheckRecord, Row

CHECKS = ("forward", "merge", "grad", "grad_bias_all")
GRADIENT_MODULES = ("test_linear.py", "test_dora_linear.py")
MODULES = {"test_linear.py": "linear", "test_dora_linear.py": "dora_linear", "test_embedding.py": "embedding"}
LITERAL_LIMIT = 16
"""Arrays of at most this many elements are written as lists; larger ones as base64 float32."""
VALUES_LIMIT = 4096
"""A case with more values than this gets no script (a shrunk case has far fewer): it would swell the report."""

_CONSTRUCT = {
    "LoRaLayerConvention": "layer = {cls}(base, rank=R, alpha=SCALE * R, dropout={dropout})",
    "LoRALinearConvention": "layer = {cls}.from_base(base, r=R, dropout={dropout}, scale=SCALE)",
    "DoRALinearConvention": "layer = {cls}.from_base(base, r=R, dropout={dropout}, scale=SCALE)",
    "LoRAEmbeddingConvention": "layer = {cls}.from_base(base, r=R, dropout={dropout}, scale=SCALE)",
    "PeftStyleConvention": "layer = {cls}(base, r=R, alpha=ALPHA, use_rslora=USE_RSLORA, dropout={dropout})",
    "PeftStyleDoRAConvention": "layer = {cls}(base, r=R, alpha=ALPHA, use_rslora=USE_RSLORA, dropout={dropout})",
    "PeftStyleEmbeddingConvention": "layer = {cls}(base, r=R, alpha=ALPHA, use_rslora=USE_RSLORA, dropout={dropout})",
}
_ADAPTER = {
    "LoRaLayerConvention": "layer.A = mlx_array(A.T)\nlayer.B = mlx_array(B.T)",
    "DoRALinearConvention": (
        "layer.lora_a = mlx_array(A.T)\nlayer.lora_b = mlx_array(B.T)\nlayer.m = mlx_array(M, mx.float32)"
    ),
    "PeftStyleDoRAConvention": "layer.lora_a = mlx_array(A.T)\nlayer.lora_b = mlx_array(B.T)\nlayer.m = mlx_array(M)",
}
_DEFAULT_ADAPTER = "layer.lora_a = mlx_array(A.T)\nlayer.lora_b = mlx_array(B.T)"


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("repro.py.j2")


def replay_command(check: CheckRecord, row: Row) -> str:
    """The suite's own replay of a check's failing case (exact): the command the run recorded, by its Python; for
    results without one, by ``python`` (one with this suite installed)."""
    return check.replay or schema.replay_command(row.subject, row.check, row.case)


def unsupported_reason(row: Row, subject: dict | None) -> str | None:
    """Why no standalone script is written for this row, or None if one is."""
    module = row.check_id.partition("::")[0]
    case = row.case
    if subject is None:
        return "the results do not say where the subject's class is"
    if row.judged_at and row.judged_at["allowed"] is None:
        return "the allowed error at the judged element is not finite"
    if (
        row.check not in CHECKS
        or module not in MODULES
        or (row.check.startswith("grad") and module not in GRADIENT_MODULES)
    ):
        return (
            f"standalone scripts cover forward and merge of {', '.join(MODULES)} and the gradients of "
            f"{', '.join(GRADIENT_MODULES)}; this is {module} {row.check}"
        )
    if subject.get("convention") not in _CONSTRUCT:
        return f"no standalone construction for {subject.get('convention')}"
    if case.get("quantization") or case.get("fan_in_fan_out"):
        return "standalone scripts cover float bases only"
    if row.check.startswith("grad") and "roles" not in subject:
        return "the results do not record the subject's parameter roles, which a gradient script needs"
    values = _values(case)
    if values > VALUES_LIMIT:
        return f"the case holds {values} values, more than the {VALUES_LIMIT} a script embeds (it was not shrunk)"
    return None


def _values(case: dict) -> int:
    """How many values a script of the case embeds, at most: W (or the table), A, B, x (or the ids), T and b or m."""
    inner = case.get("in_features") or case.get("num_embeddings")
    outer = case.get("out_features") or case.get("dims")
    batch = math.prod(case["batch_shape"])
    return inner * outer + case["r"] * (inner + outer) + batch * (inner + outer) + outer


def _literal(array: np.ndarray) -> str:
    values = np.asarray(array, dtype=np.float32)
    if values.size <= LITERAL_LIMIT:
        return f"np.array({values.astype(np.float64).tolist()!r}, dtype=np.float32).reshape({values.shape})"
    encoded = base64.b64encode(values.tobytes()).decode()
    return f'values("{encoded}", {values.shape})'


def script(row: Row, subject: dict) -> str:
    """The standalone script reproducing a row of a check it covers (see `unsupported_reason`)."""
    from foundation.cases import upstream_gradient  # the suite's own case builder
    from foundation.rebuild import case_from_description

    case = case_from_description(row.case)
    judged = row.judged_at or {"quantity": None, "index": (), "allowed": None}  # None: no numeric comparison
    embedding = row.case.get("kind") == "embedding"
    linear = case.lookup if embedding else case
    arrays = [("A", linear.lora_A), ("B", linear.lora_B)]
    if embedding:
        arrays = [("TABLE", case.weight), *arrays]
    else:
        arrays = [("W", case.weight), *([("BIAS", case.bias)] if case.has_bias else []), *arrays, ("X", case.x)]
    if linear.use_dora:
        arrays.append(("M", linear.magnitude))
    grads = row.check.startswith("grad")
    if grads:
        arrays.append(("UPSTREAM", upstream_gradient(case)))
    literals = [(name, _literal(values)) for name, values in arrays]
    if embedding:
        literals.append(("IDS", f"np.array({case.ids.tolist()!r}, dtype=np.int64)"))
    convention = subject["convention"]
    merge_function = "replace_lora_with_linear" if convention == "LoRaLayerConvention" and row.check == "merge" else ""
    return _template().render(
        subject=row.subject,
        check=row.check,
        check_id=row.check_id,
        dtype=row.dtype,
        module=subject["module"],
        cls=subject["class"],
        merge_function=merge_function,
        peft_class="Embedding" if embedding else "Linear",
        allowed=repr(judged["allowed"]),
        judged_quantity=repr(judged["quantity"]),
        judged_index=repr(tuple(judged["index"])),
        r=linear.r,
        alpha=repr(linear.alpha),
        use_rslora=linear.use_rslora,
        scale=repr(linear.scale),
        arrays=literals,
        embedding=embedding,
        in_features=linear.in_features,
        out_features=linear.out_features,
        has_bias=linear.has_bias,
        use_dora=linear.use_dora,
        construct=_CONSTRUCT[convention].format(cls=subject["class"], dropout=repr(linear.dropout)),
        grads=grads,
        bias_trains=row.check == "grad_bias_all" and linear.has_bias,
        roles=repr(subject.get("roles")),
        adapter=_ADAPTER.get(convention, _DEFAULT_ADAPTER),
    )
