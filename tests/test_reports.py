"""Reports rendered from a results file."""

from reports import matrix


def _check(check_id: str, subject: str, dtype: str, check: str, status: str) -> dict:
    return {"check_id": check_id, "subject": subject, "dtype": dtype, "check": check, "status": status}


def test_matrix_has_a_table_per_subject_and_the_most_severe_status_first():
    results = {
        "checks": [
            _check("test_linear.py::test_forward[s-float32]", "s", "float32", "forward", "pass"),
            _check("test_quantized_linear.py::test_merge[s-float32-affine]", "s", "float32", "merge", "pass"),
            _check("test_quantized_linear.py::test_merge[s-float32-mxfp4]", "s", "float32", "merge", "known divergence"),
            _check("test_linear.py::test_forward[s-float16]", "s", "float16", "forward", "fail"),
            _check("test_quantized_linear.py::test_quantized_matmul_accumulation[float16]", "None", "float16", "x", "pass"),
        ]
    }
    lines = matrix.render(results).splitlines()
    assert lines[0] == "**s**"
    assert "| module:check | float32 | float16 |" in lines
    assert "| linear:forward | pass | fail |" in lines
    assert "| quantized_linear:merge | known div. / pass | – |" in lines
    assert not any("None" in line for line in lines)
