"""Small results documents written by hand, for tests of what reads results (reports, the gate)."""

from __future__ import annotations

from foundation.schema import FORMAT, Row

META = {
    "versions": {"mlx": "1", "mlx-vlm": "0.7.10"},
    "device": "cpu",
    "profile": "ci",
    "seed": "derandomized",
    "subjects": {},
}


def check(check_id: str, subject: str, dtype: str, name: str, status: str, longrepr: str = "") -> dict:
    """A results file's entry for one test item."""
    return {
        "check_id": check_id,
        "subject": subject,
        "dtype": dtype,
        "check": name,
        "status": status,
        "explained": {},
        "longrepr": longrepr,
    }


def forward(subject: str, dtype: str, status: str) -> dict:
    """The linear forward check of `subject` in `dtype`."""
    return check(f"test_linear.py::test_forward[{subject}-{dtype}]", subject, dtype, "forward", status)


def model_logits(subject: str, dtype: str, status: str) -> dict:
    """The whole-model logits check of `subject` in `dtype`: it judges the function a saved adapter gives."""
    return check(f"test_models.py::test_logits[{subject}-{dtype}]", subject, dtype, "logits", status) | {
        "judges_saved_adapters": True
    }


def divergence(check_id: str, status: str, now_passing: list[str] = (), explained: int = 0) -> dict:
    """A results file's entry for one line of the known-divergences file."""
    return {
        "check_id": check_id,
        "explains": "output: beyond margin 1..2",
        "line": 1,
        "reason": "why",
        "status": status,
        "explained": explained,
        "now_passing": list(now_passing),
    }


def row(check_id: str, check: str, case: dict, verdict: str = "fail", margin: float | None = None, **fields) -> Row:
    """A row of a case of `check`, its numbers left out (unless given in `fields`, which override any field)."""
    return Row.from_json(
        {
            "check_id": check_id,
            "subject": "s",
            "check": check,
            "dtype": "float32",
            "case": case,
            "verdict": verdict,
            "margin": margin,
            "max_error": None,
            "allowed_error": None,
            "worst": "",
            "failures": [],
            "explained_by": [],
            "hints": [],
            "judged_at": None,
            "final": True,
            "versions": {},
            "device": "cpu",
            **fields,
        }
    )


def document(checks: list[dict], meta: dict = META, divergences: list[dict] = (), rows: list[Row] = ()) -> dict:
    return {
        "format": FORMAT,
        "meta": meta,
        "rows": [r.to_json() for r in rows],
        "checks": checks,
        "known_divergences": list(divergences),
    }
