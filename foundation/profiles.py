"""Hypothesis profiles: ``ci`` (derandomized, fast), ``dev`` (the default) and ``thorough`` (nightly).

Choose one with ``--hypothesis-profile``. Besides Hypothesis' own settings, a profile decides how
large the drawn layers may be, so the thorough profile also reaches inner dimensions in the thousands.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings


@dataclass(frozen=True)
class Sizes:
    max_features: int
    max_rank: int


SIZES = {
    "ci": Sizes(max_features=256, max_rank=64),
    "dev": Sizes(max_features=320, max_rank=64),
    "thorough": Sizes(max_features=2048, max_rank=64),
}
DEFAULT = "dev"

_common = dict(
    deadline=None,
    # Hypothesis' "explain" phase lists the lines only failing cases ran: here, always the message code.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, **_common)
# Explicitly random: under a CI environment variable Hypothesis' own defaults are derandomized, and a
# profile inherits the defaults, so `--hypothesis-seed` would be ignored and every nightly run the same.
settings.register_profile("dev", max_examples=100, derandomize=False, **_common)
settings.register_profile("thorough", max_examples=2000, derandomize=False, **_common)
settings.load_profile(DEFAULT)


def active() -> str:
    """The name of the Hypothesis profile in force (one of ours, or a user's own)."""
    return settings.get_current_profile_name()


@contextmanager
def loaded(name: str) -> Iterator[None]:
    """The profile `name` in force inside the block, the one before it again after it."""
    before = active()
    settings.load_profile(name)
    try:
        yield
    finally:
        settings.load_profile(before)


def sizes() -> Sizes:
    return SIZES.get(active(), SIZES[DEFAULT])


def examples(profile: str, fraction: int = 1) -> int:
    """What a check given 1/`fraction` of the profile's examples draws."""
    return _fraction_of(settings.get_profile(profile).max_examples, fraction)


def _fraction_of(max_examples: int, fraction: int) -> int:
    return max(10, max_examples // fraction)


def fewer_examples(fraction: int) -> settings:
    """The active profile with 1/`fraction` of its examples, for the many parametrizations of one family.

    Applied as a decorator at import, after Hypothesis has loaded the chosen profile.
    """
    return settings(max_examples=_fraction_of(settings.default.max_examples, fraction))
