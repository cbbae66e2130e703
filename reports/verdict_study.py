"""The verdict's measured false-alarm and detection figures (``verdict_study.json``), shown in every report."""

from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).with_name("verdict_study.json")


def load(path: Path = PATH) -> dict:
    return json.loads(path.read_text())
