"""The code keeps to the width the project declares (pyproject.toml's ``line-length``, which ruff formats to)."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tests.meta_tests.test_imports import LAYER_OF


def declared_width() -> int:
    found = re.search(r"^line-length\s*=\s*(\d+)", (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml declares no line-length"
    return int(found.group(1))


def test_no_line_of_the_project_s_code_is_wider_than_declared():
    width = declared_width()
    wide = [
        f"{path.relative_to(ROOT)}:{number}: {len(line)} columns"
        for package in LAYER_OF
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if len(line) > width
    ]
    assert not wide, (
        f"lines wider than {width} columns (ruff format --line-length {width}; split what it cannot):\n"
        + ("\n".join(wide))
    )
