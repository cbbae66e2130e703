"""The suite fails every wrong LoRA layer in the catalogue, and passes the correct one."""

import pytest

from catalogue import CORRECT, WRONG_VARIANTS


@pytest.mark.parametrize("subject", CORRECT, ids=str)
def test_correct_layer_passes_every_check_in_every_dtype(subject, run_suite):
    run = run_suite("--subject", subject.name)
    assert run.ret == 0, run.output
    statuses = {c["status"] for c in run.results["checks"] if c["subject"] == subject.name}
    # Known divergences of the base op itself (the CPU's mxfp8 float16 quantized_matmul) hold for any layer on it.
    assert statuses <= {"pass", "known divergence", "missed this run"} and "pass" in statuses
    own = [c for c in run.results["checks"] if c["subject"] == subject.name and c["status"] == "known divergence"]
    # and peft's own divergences (its side of a check), which are no fault of the layer's
    of_peft = {row["check_id"] for row in run.results["rows"] if _only_the_references(row)}
    assert all(c["check_id"].endswith("-float16-mxfp8]") or c["check_id"] in of_peft for c in own), own


def _only_the_references(row: dict) -> bool:
    """Whether every known divergence that explains the row is on the reference's side."""
    return bool(row["explained_by"]) and all(" | reference " in entry for entry in row["explained_by"])


@pytest.mark.parametrize("name", sorted(WRONG_VARIANTS))
def test_wrong_variant_fails_in_every_dtype_where_visible(name, run_suite):
    variant = WRONG_VARIANTS[name]
    run = run_suite("--subject", variant.subject.name, *variant.selection, module=variant.module)
    assert run.ret == 1, run.output
    for dtype in variant.visible_in:
        assert "fail" in run.status(variant.check, dtype), f"{name} {variant.check} passed in {dtype}"
    if variant.by_check_run:
        pooled = [p for c in run.results["checks"] if c["status"] == "fail" for p in c["systematic"]]
        assert any(p["verdict"] == "fail" for p in pooled), run.output
        assert "a systematic error beyond what rounding explains" in run.output
        return
    failing = [row for row in run.results["rows"] if row["verdict"] == "fail" and row["final"]]
    assert failing and all(row["failures"] for row in failing)
    if variant.diagnosis:
        assert any(variant.diagnosis in hint for row in failing for hint in row["hints"]), failing[0]
        assert variant.diagnosis in run.output
