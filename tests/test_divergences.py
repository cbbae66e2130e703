"""The known-divergences file: what an entry explains, ids and patterns, device marks, and its errors."""

import numpy as np
import pytest

from conformance import divergences
from conformance.divergences import DivergenceFileError, Explanation, parse_explanation
from foundation.dtypes import FLOAT16
from foundation.verdict import Comparison, Measurement, Tracked, compare, compare_dtype, failed, raised

ID = "test_a.py::test_b[x-float16]"


def _load(tmp_path, text, device="cpu"):
    path = tmp_path / "known.txt"
    path.write_text(text)
    return divergences.load(path, device)


def _beyond(margin: float, quantity: str = "output", non_finite: bool = False) -> Comparison:
    expected = Tracked(np.ones(3), np.full(3, 1e-3), FLOAT16)
    observed = np.array([1.0, 1.0, np.inf if non_finite else 1.0 + margin * 1e-3])
    return compare(quantity, "subject", observed, expected)


@pytest.mark.parametrize(
    ("text", "explanation"),
    [
        ("merged weight: dtype float32", Explanation("merged weight", "dtype", argument="float32")),
        ("reference output: non-finite", Explanation("output", "non-finite", side="reference")),
        (
            "forward: raises ValueError ~ would not load",
            Explanation("forward", "raises", argument="ValueError", pattern="would not load"),
        ),
        ("*: raises RuntimeError", Explanation("*", "raises", argument="RuntimeError")),
        ("grad *: beyond margin 1..1e3", Explanation("grad *", "beyond", margins=(1.0, 1000.0))),
        ("output: beyond hint ~ weight norm", Explanation("output", "beyond", pattern="weight norm")),
        ("r=0: computes", Explanation("r=0", "computes")),
        ("weights: absent ~ switch_mlp", Explanation("weights", "absent", pattern="switch_mlp")),
    ],
)
def test_an_explanation_reads_as_written_and_prints_back(text, explanation):
    assert parse_explanation(text) == explanation
    assert parse_explanation(str(explanation)) == explanation


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("output beyond", "'[side] quantity: failure'"),
        ("output: wrong", "unknown failure 'wrong'; valid: beyond, non-finite, dtype"),
        ("output: beyond", "needs the margin range"),
        ("output: beyond margin 1..x", "'x' is not a number"),
        ("output: beyond because", "'margin LO..HI' and/or 'hint ~ REGEX'"),
        ("output: dtype", "needs the dtype's name"),
        ("forward: raises", "needs the exception's type"),
        ("forward: raises ValueError ~ (", "is not a regular expression"),
        ("output: non-finite everywhere", "after 'non-finite', only '~ REGEX'"),
    ],
)
def test_an_explanation_that_cannot_be_read_says_why(text, message):
    with pytest.raises(ValueError, match=None) as error:
        parse_explanation(text)
    assert message in str(error.value)


def test_an_entry_explains_only_the_failure_it_names():
    dtype = Explanation("merged weight", "dtype", argument="float32")
    expected = Tracked(np.ones(2), np.zeros(2), FLOAT16)
    assert dtype.explains(compare_dtype("merged weight", "subject", "float32", expected), [])
    assert not dtype.explains(compare_dtype("merged weight", "subject", "bfloat16", expected), [])
    assert not dtype.explains(compare_dtype("merged output", "subject", "float32", expected), [])
    assert not dtype.explains(compare_dtype("merged weight", "reference", "float32", expected), [])

    margins = Explanation("output", "beyond", margins=(1.0, 10.0))
    assert margins.explains(_beyond(5.0), []) and not margins.explains(_beyond(50.0), [])
    assert not margins.explains(_beyond(5.0, non_finite=True), [])
    assert Explanation("output", "non-finite").explains(_beyond(5.0, non_finite=True), [])
    hint = Explanation("output", "beyond", pattern="weight norm")
    assert hint.explains(_beyond(50.0), ["the weight norm overflows in float16"])
    assert not hint.explains(_beyond(50.0), ["other"])

    raises = Explanation("*", "raises", argument="ValueError", pattern="would not load")
    assert raises.explains(raised(ValueError("lora_a would not load"), "forward", "subject"), [])
    assert not raises.explains(raised(ValueError("shapes differ"), "forward", "subject"), [])
    assert not raises.explains(raised(TypeError("would not load"), "forward", "subject"), [])
    assert not Explanation("r=0", "computes").explains(failed("computed", "r=0", "subject", "non-finite"), [])


def test_an_outcome_s_pattern_must_find_what_the_check_says_so_that_another_such_failure_is_not_explained():
    stacked = Explanation("weights", "absent", pattern="switch_mlp")
    assert stacked.explains(failed("initialised model.layers.0.mlp.switch_mlp.up_proj.weight", "weights", "subject",
                                   "absent"), [])  # fmt: skip
    assert not stacked.explains(failed("initialised model.layers.0.self_attn.q_proj.weight", "weights", "subject",
                                       "absent"), [])  # fmt: skip


def test_a_measurement_is_judged_failure_by_failure():
    promotes = Explanation("merged weight", "dtype", argument="float32")
    entries = [divergences.KnownDivergence(ID, promotes, "promotes", 3)]
    measurement = Measurement("s", "merge", {})
    expected = Tracked(np.ones(3), np.full(3, 1e-3), FLOAT16)
    measurement.comparisons += [
        compare_dtype("merged weight", "subject", "float32", expected),
        _beyond(50.0, "merged weight"),
    ]
    judgement = divergences.judge(measurement, entries)
    assert [c.kind for c, _ in judgement.explained] == ["dtype"]
    assert [c.failure for c in judgement.unexplained] == ["beyond"] and not judgement.passed
    assert divergences.judge(Measurement("s", "merge", {}, measurement.comparisons[:1]), entries).passed


def test_entries_need_what_they_explain_and_a_reason_and_are_listed_once(tmp_path):
    with pytest.raises(DivergenceFileError, match="has no reason"):
        _load(tmp_path, f"{ID} | output: non-finite\n")
    with pytest.raises(DivergenceFileError, match="does not say which failure it explains"):
        _load(tmp_path, f"{ID}  # why\n")
    with pytest.raises(DivergenceFileError, match=r"known.txt:1: .*unknown failure"):
        _load(tmp_path, f"{ID} | output: odd  # why\n")
    with pytest.raises(DivergenceFileError, match=r"listed twice with this explanation \(lines 1 and 2\)"):
        _load(tmp_path, f"{ID} | output: non-finite  # one\n{ID} | output: non-finite  # two\n")
    two = _load(tmp_path, f"{ID} | output: non-finite  # one\n{ID} | output: dtype float32  # two\n")
    assert [(e.line, e.reason) for e in two] == [(1, "one"), (2, "two")]


def test_patterns_match_whole_ids_and_every_entry_covering_an_id_applies(tmp_path):
    known = _load(
        tmp_path,
        "test_a.py::test_*[mlx_lm.DoRAEmbedding-*] | *: raises NotExpressible  # axis\n"
        "test_a.py::test_forward[*] | output: non-finite  # exact\n",
    )

    def lines(check_id: str) -> list[int]:
        return [e.line for e in divergences.covering(known, check_id)]

    assert lines("test_a.py::test_forward[mlx_lm.DoRAEmbedding-float16]") == [1, 2]
    assert lines("test_a.py::test_forward[mlx_vlm.DoRAEmbedding-float16]") == [2]
    assert not divergences.covering(known, "test_a.py::test_merge[mlx_lm.DoRAEmbedding-float16]x")


def test_device_marks_keep_an_entry_to_its_device(tmp_path):
    text = (
        "test_a.py::test_b[x] @cpu | y: non-finite  # cpu kernel\n"
        "test_a.py::test_c[x] @gpu @sometimes | y: non-finite  # metal\n"
    )
    on_cpu, on_gpu = _load(tmp_path, text, "cpu"), _load(tmp_path, text, "gpu")
    assert [e.check_id for e in on_cpu] == ["test_a.py::test_b[x]"] and on_cpu[0].device == "cpu"
    assert [e.check_id for e in on_gpu] == ["test_a.py::test_c[x]"] and on_gpu[0].sometimes
    with pytest.raises(DivergenceFileError, match="unknown mark @tpu"):
        _load(tmp_path, "test_a.py::test_b[x] @tpu | y: non-finite  # no\n")


def test_the_suites_own_file_loads_on_every_device():
    for device in divergences.DEVICES:
        assert divergences.load(divergences.DEFAULT_PATH, device)
