"""Known divergences: failures the suite expects, each entry saying which failure it explains and why.

One entry a line, in the spirit of array-api-tests' xfails file::

    test_dora_linear.py::test_merge[mlx_*.DoRALinear-*16] | merged weight: dtype float32  # fuse() promotes

The check id (the test module's file name and the test's name with its parameters; ``*`` stands for
any text) comes first, then ``|``, what is wrong, and after ``#`` the reason it is understood. What is
wrong names a side (``subject``, the default, or ``reference``), a quantity (``*`` allowed; for a raise,
the check's or scenario's name) and the failure (`Comparison.failure`)::

    dtype NAME                 comes back in dtype NAME
    raises TYPE [~ REGEX]      raises TYPE (or one of TYPE|TYPE...), with a message REGEX finds
    non-finite                 inf or NaN elements where the oracle's are finite
    beyond margin LO..HI       finite values beyond the bound, by a margin from LO to HI
    beyond hint ~ REGEX        the same, where the check's diagnosis has a hint REGEX finds
    systematic [~ REGEX]       the check run's pooled error along a term of the formula is beyond what rounding
                               explains (`foundation.systematic`), where REGEX finds its description
    computes, convention, shape, absent, present, settings, trainable, premise, modules [~ REGEX]
                               what the check reports of that name (``computes``: where peft raises;
                               ``convention``: the subject defines the layer otherwise than peft;
                               ``modules``: a whole model's adapted modules are not peft's), where REGEX finds
                               what it says

A check is a known divergence only when its entries explain every failing comparison of every case;
anything else fails the check. A check may have several entries, one per failure. An entry that
explains nothing in a check it covers fails that check ("remove this entry") unless it is marked
``@sometimes``: a bug only some drawn cases reach, which a thorough run must still see once. ``@cpu``
and ``@gpu`` keep an entry to that MLX device.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from foundation.verdict import Comparison, Measurement

DEFAULT_PATH = Path(__file__).with_name("known_divergences.txt")
DEVICES = ("cpu", "gpu")
SIDES = ("subject", "reference")
FAILURES = (
    "beyond",
    "non-finite",
    "dtype",
    "raises",
    "computes",
    "convention",
    "shape",
    "absent",
    "present",
    "settings",
    "trainable",
    "premise",
    "systematic",
    "modules",
)
"""What an entry may say is wrong: `Comparison.failure`'s words."""


class DivergenceFileError(ValueError):
    pass


def _wildcards(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True)
class Explanation:
    """Which failing comparison an entry explains."""

    quantity: str
    failure: str
    side: str = "subject"
    argument: str | None = None
    """The dtype it comes back in; the type of what it raises."""
    pattern: str | None = None
    """A regular expression: in the message of what it raises; in the diagnosis of values beyond the bound."""
    margins: tuple[float, float] | None = None

    @functools.cached_property
    def _quantities(self) -> re.Pattern[str]:
        return _wildcards(self.quantity)

    def covers(self, quantity: str) -> bool:
        """Whether its quantity pattern names `quantity`."""
        return self._quantities.fullmatch(quantity) is not None

    def explains(self, comparison: Comparison, hints: list[str]) -> bool:
        if comparison.failure != self.failure or comparison.side != self.side:
            return False
        if not self.covers(comparison.quantity):
            return False
        if self.argument is not None and comparison.detail not in self.argument.split("|"):
            return False
        if self.margins is not None and not self.margins[0] <= comparison.margin <= self.margins[1]:
            return False
        if self.pattern is not None:
            texts = hints if self.failure == "beyond" else [comparison.problem or ""]
            return any(re.search(self.pattern, text) for text in texts)
        return True

    def __str__(self) -> str:
        words = [self.side, f"{self.quantity}:", self.failure]
        if self.argument is not None:
            words.append(self.argument)
        if self.margins is not None:
            words.append(f"margin {self.margins[0]:g}..{self.margins[1]:g}")
        if self.pattern is not None:
            words += ["hint ~" if self.failure == "beyond" else "~", self.pattern]
        return " ".join(words)


@dataclass(frozen=True)
class KnownDivergence:
    check_id: str
    """The check id, or a pattern of them with ``*`` wildcards."""
    explanation: Explanation
    reason: str
    line: int
    """Its line in the file: what tells entries apart in results and messages."""
    device: str | None = None
    """The MLX device the divergence is seen on; None: every device."""
    sometimes: bool = False
    """Only some cases reach it: not seeing it in one run does not mean fixed."""

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        return _wildcards(self.check_id)

    def matches(self, check_id: str) -> bool:
        return self._pattern.fullmatch(check_id) is not None

    def __str__(self) -> str:
        return f"{self.check_id} | {self.explanation}"


def covering(entries: list[KnownDivergence], check_id: str) -> list[KnownDivergence]:
    """The entries that cover a check id."""
    return [entry for entry in entries if entry.matches(check_id)]


@dataclass
class Judgement:
    """A measurement's failing comparisons, each explained by an entry or not."""

    explained: list[tuple[Comparison, KnownDivergence]] = field(default_factory=list)
    unexplained: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Nothing fails that an entry does not explain."""
        return not self.unexplained

    def entry_of(self, comparison: Comparison) -> KnownDivergence | None:
        return next((entry for c, entry in self.explained if c is comparison), None)


def judge(measurement: Measurement, entries: list[KnownDivergence]) -> Judgement:
    """Which of the measurement's failures `entries` (those covering its check) explain."""
    judgement = Judgement()
    for comparison in measurement.comparisons:
        if comparison.passed:
            continue
        entry = next((e for e in entries if e.explanation.explains(comparison, measurement.hints)), None)
        if entry is None:
            judgement.unexplained.append(comparison)
        else:
            judgement.explained.append((comparison, entry))
    return judgement


_FAILURE = re.compile(r"(?P<failure>[\w-]+)(?:\s+(?P<rest>.*))?")
_MARGINS = re.compile(r"margin\s+(?P<low>\S+?)\.\.(?P<high>\S+)\s*")
_HINT = re.compile(r"hint\s+~\s*(?P<pattern>.+)")


def parse_explanation(text: str) -> Explanation:
    """``[SIDE] QUANTITY: FAILURE ...`` (see the module's docstring); ValueError says what is wrong."""
    what, colon, problem = text.partition(": ")
    if not colon:
        raise ValueError(f"{text!r}: write what is wrong as '[side] quantity: failure'")
    side, _, quantity = what.strip().partition(" ")
    if side not in SIDES:
        side, quantity = "subject", what.strip()
    found = _FAILURE.fullmatch(problem.strip())
    failure, rest = (found["failure"], (found["rest"] or "").strip()) if found else ("", "")
    if failure not in FAILURES:
        raise ValueError(f"unknown failure {failure or problem!r}; valid: {', '.join(FAILURES)}")
    if not quantity:
        raise ValueError(f"{text!r}: name the quantity (or '*')")
    if failure == "dtype":
        if not re.fullmatch(r"\w+", rest):
            raise ValueError(f"{text!r}: 'dtype' needs the dtype's name, e.g. 'dtype float32'")
        return Explanation(quantity, failure, side, argument=rest)
    if failure == "raises":
        kind, _, pattern = rest.partition("~")
        if not re.fullmatch(r"\w+(\|\w+)*", kind.strip()):
            raise ValueError(
                f"{text!r}: 'raises' needs the exception's type (or types, 'TypeError|ValueError'), "
                "e.g. 'raises ValueError ~ message'"
            )
        message = _regex(pattern.strip()) if pattern else None
        return Explanation(quantity, failure, side, argument=kind.strip(), pattern=message)
    if failure == "beyond":
        margins = _MARGINS.match(rest)
        bounds = None
        if margins:
            bounds = (_number(margins["low"]), _number(margins["high"]))
            rest = rest[margins.end() :]
        hint = _HINT.fullmatch(rest.strip()) if rest.strip() else None
        if rest.strip() and hint is None:
            raise ValueError(f"{text!r}: after 'beyond', 'margin LO..HI' and/or 'hint ~ REGEX'")
        if bounds is None and hint is None:
            raise ValueError(
                f"{text!r}: 'beyond' needs the margin range ('margin 1..1e3') or the diagnosis "
                "('hint ~ REGEX') typical for it"
            )
        diagnosis = _regex(hint["pattern"].strip()) if hint else None
        return Explanation(quantity, failure, side, pattern=diagnosis, margins=bounds)
    if rest and not rest.startswith("~"):
        raise ValueError(f"{text!r}: after '{failure}', only '~ REGEX' (e.g. 'systematic ~ LoRA term')")
    return Explanation(quantity, failure, side, pattern=_regex(rest[1:].strip()) if rest else None)


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{pattern!r} is not a regular expression: {error}") from None
    return pattern


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise ValueError("a margin cannot be NaN")
    return value


def load(path: Path, device: str) -> list[KnownDivergence]:
    """The entries of a known-divergences file that hold on `device`; each needs what it explains and a reason."""
    entries: list[KnownDivergence] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry, _, reason = (part.strip() for part in line.partition("#"))
        check_id, bar, explanation = (part.strip() for part in entry.partition("|"))
        check_id, *marks = check_id.split(" @")
        check_id = check_id.strip()
        marks = [mark.strip() for mark in marks]
        where = f"{path}:{number}: {check_id}"
        if not reason:
            raise DivergenceFileError(f"{where} has no reason (write it after a #)")
        if not bar:
            raise DivergenceFileError(
                f"{where} does not say which failure it explains (after a |: "
                "'[side] quantity: failure', e.g. '| merged weight: dtype float32')"
            )
        try:
            explains = parse_explanation(explanation)
        except ValueError as error:
            raise DivergenceFileError(f"{where}: {error}") from None
        unknown = [mark for mark in marks if mark not in (*DEVICES, "sometimes")]
        if unknown:
            raise DivergenceFileError(f"{path}:{number}: unknown mark @{unknown[0]}; valid: @cpu, @gpu, @sometimes")
        key = f"{check_id} | {explains}"
        if key in seen:
            raise DivergenceFileError(f"{where} is listed twice with this explanation (lines {seen[key]} and {number})")
        seen[key] = number
        only_on = next((mark for mark in marks if mark in DEVICES), None)
        if only_on in (None, device):
            entries.append(KnownDivergence(check_id, explains, reason, number, only_on, "sometimes" in marks))
    return entries
