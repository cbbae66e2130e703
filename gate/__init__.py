"""The gate: run the conformance suite on one mlx-vlm (or mlx-lm) source, as a pull request's CI does.

``python -m gate SOURCE`` builds an isolated environment with this suite and the source, runs the
suite on that package's subjects, and decides. Exit codes:

- 0: no new failure;
- 1: a new failure (with a baseline: a check that fails now and did not fail in the base);
- 2: the gate was called wrongly (an unknown option);
- 3: the set-up is broken (the source cannot be installed, provides no subject, the suite could not
  run, the baseline cannot be read); one line says why.
"""

PASSED = 0
NEW_FAILURE = 1
USAGE_ERROR = 2
SETUP_FAILED = 3


class SetupError(Exception):
    """The gate cannot judge: its environment or inputs are broken. The message is one line."""
