"""Known divergences: check ids expected to fail, each with the reason it is understood.

The file has one entry a line, in the spirit of array-api-tests' xfails file::

    test_linear.py::test_merge[mlx_vlm.LoRaLayer-float32]  # replace_lora_with_linear raises ...

A check id is the test module's file name and the test's name with its parameters; ``*`` in an
entry stands for any text, so one entry can cover a subject's every check and dtype. An entry that
ends in ``@cpu`` or ``@gpu`` holds only on that MLX device; one marked ``@sometimes`` is a bug that
only some drawn cases reach, so a run that happens to miss it does not report it as fixed. Other
entries that start passing are reported at the end of the run, never kept silently.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("known_divergences.txt")


class DivergenceFileError(ValueError):
    pass


@dataclass(frozen=True)
class KnownDivergence:
    check_id: str
    """The check id, or a pattern of them with ``*`` wildcards."""
    reason: str
    device: str | None = None
    """The MLX device the divergence is seen on; None: every device."""
    sometimes: bool = False
    """Only some cases reach it: passing in one run does not mean fixed."""

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(".*".join(re.escape(part) for part in self.check_id.split("*")))

    def matches(self, check_id: str) -> bool:
        return self._pattern.fullmatch(check_id) is not None


def find(entries: dict[str, KnownDivergence], check_id: str) -> KnownDivergence | None:
    """The entry that covers a check id: its own line first, else the first pattern that matches."""
    patterns = (entry for entry in entries.values() if "*" in entry.check_id)
    return entries.get(check_id) or next((entry for entry in patterns if entry.matches(check_id)), None)


DEVICES = ("cpu", "gpu")


def load(path: Path, device: str) -> dict[str, KnownDivergence]:
    """The entries of a known-divergences file that hold on `device`, by check id; each needs a reason."""
    entries: dict[str, KnownDivergence] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        check_id, _, reason = (part.strip() for part in line.partition("#"))
        check_id, *marks = check_id.split(" @")
        check_id = check_id.strip()
        marks = [mark.strip() for mark in marks]
        if not reason:
            raise DivergenceFileError(f"{path}:{number}: {check_id} has no reason (write it after a #)")
        unknown = [mark for mark in marks if mark not in (*DEVICES, "sometimes")]
        if unknown:
            raise DivergenceFileError(f"{path}:{number}: unknown mark @{unknown[0]}; valid: @cpu, @gpu, @sometimes")
        if check_id in entries:
            raise DivergenceFileError(f"{path}:{number}: {check_id} is listed twice")
        only_on = next((mark for mark in marks if mark in DEVICES), None)
        if only_on in (None, device):
            entries[check_id] = KnownDivergence(check_id, reason, only_on, "sometimes" in marks)
    return entries
