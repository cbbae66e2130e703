"""The known-divergences file: ids, patterns, device marks, intermittent bugs and its errors."""

import pytest

from conformance import divergences
from conformance.divergences import DivergenceFileError


def _load(tmp_path, text, device="cpu"):
    path = tmp_path / "known.txt"
    path.write_text(text)
    return divergences.load(path, device)


def test_entries_need_reasons_and_are_listed_once(tmp_path):
    with pytest.raises(DivergenceFileError, match="has no reason"):
        _load(tmp_path, "test_a.py::test_b[x-float32]\n")
    with pytest.raises(DivergenceFileError, match="listed twice"):
        _load(tmp_path, "test_a.py::test_b[x]  # one\ntest_a.py::test_b[x]  # two\n")


def test_patterns_match_whole_ids_and_brackets_are_literal(tmp_path):
    known = _load(tmp_path, "test_a.py::test_*[mlx_lm.DoRAEmbedding-*]  # axis\n")
    assert divergences.find(known, "test_a.py::test_forward[mlx_lm.DoRAEmbedding-float16]")
    assert not divergences.find(known, "test_a.py::test_forward[mlx_vlm.DoRAEmbedding-float16]")
    assert not divergences.find(known, "test_a.py::test_forward[mlx_lm.DoRAEmbedding-float16]x")


def test_an_exact_entry_wins_over_a_pattern(tmp_path):
    known = _load(tmp_path, "test_a.py::test_*[*]  # broad\ntest_a.py::test_b[x]  # exact\n")
    assert divergences.find(known, "test_a.py::test_b[x]").reason == "exact"


def test_device_marks_keep_an_entry_to_its_device(tmp_path):
    text = "test_a.py::test_b[x] @cpu  # cpu kernel\ntest_a.py::test_c[x] @gpu @sometimes  # metal\n"
    on_cpu, on_gpu = _load(tmp_path, text, "cpu"), _load(tmp_path, text, "gpu")
    assert list(on_cpu) == ["test_a.py::test_b[x]"] and on_cpu["test_a.py::test_b[x]"].device == "cpu"
    assert list(on_gpu) == ["test_a.py::test_c[x]"] and on_gpu["test_a.py::test_c[x]"].sometimes
    with pytest.raises(DivergenceFileError, match="unknown mark @tpu"):
        _load(tmp_path, "test_a.py::test_b[x] @tpu  # no\n")
