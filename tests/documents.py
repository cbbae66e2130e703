"""Small results documents written by hand, for tests of what reads results (reports, the gate)."""

from __future__ import annotations

META = {"versions": {"mlx": "1", "mlx-vlm": "0.7.10"}, "device": "cpu", "profile": "ci", "seed": "derandomized", "subjects": {}}


def check(check_id: str, subject: str, dtype: str, name: str, status: str, longrepr: str = "") -> dict:
    """A results file's entry for one test item."""
    return {"check_id": check_id, "subject": subject, "dtype": dtype, "check": name, "status": status, "longrepr": longrepr}


def forward(subject: str, dtype: str, status: str) -> dict:
    """The linear forward check of `subject` in `dtype`."""
    return check(f"test_linear.py::test_forward[{subject}-{dtype}]", subject, dtype, "forward", status)


def document(checks: list[dict], meta: dict = META, divergences: list[dict] = ()) -> dict:
    return {"format": 1, "meta": meta, "rows": [], "checks": checks, "known_divergences": list(divergences)}
