"""The suite's thread policy: how many threads the numerical libraries of each of its processes may use.

The suite's matrices are small. A thread pool gains nothing on them and costs a great deal when
processes share few cores: torch's OpenMP pool, NumPy's BLAS pool and MLX each start one per
process, and two xdist workers on two cores with two threads each spin against each other. So every
process the suite starts (the pytest plugin and each xdist worker, the studies and their workers,
the benchmark, replay) applies one policy before its first numerical operation: by default one
intra-op thread. ``--threads N`` (the plugin, the benchmark, the studies) or the environment variable
``CONFORMANCE_THREADS`` chooses another number, or ``native``: each library's own default.

What is set: torch's intra-op and inter-op threads (``torch.set_num_threads``, which also sets the
MKL and oneDNN threads inside torch), every BLAS and OpenMP library `threadpoolctl` finds (NumPy's
OpenBLAS, torch's libgomp), and the usual environment variables, so that child processes start with
the policy too. MLX's CPU backend has no thread setting: its BLAS is single-threaded and it runs
each stream's work on one thread of its own; `in_force` says so.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

ENVIRONMENT = "CONFORMANCE_THREADS"
DEFAULT = 1
NATIVE = "native"
"""The policy that sets nothing: each library keeps its own default pool size."""
CHILD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
"""Read by OpenMP, OpenBLAS, MKL and Accelerate when a process loads them: set for the processes started later."""
MLX_CPU = "no setting (single-threaded BLAS; one thread per stream)"


@dataclass(frozen=True)
class Policy:
    threads: int | None
    """Threads per library and process; None for `NATIVE`."""
    source: str
    """Where it was chosen: ``default``, ``--threads`` or the environment variable."""

    def __str__(self) -> str:
        count = NATIVE if self.threads is None else str(self.threads)
        return f"{count} ({self.source})"


def parse(text: str) -> int | None:
    """A policy's value: a whole number of threads (1 or more), or ``native``; ValueError otherwise."""
    if text.strip().lower() == NATIVE:
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"threads {text!r}: should be a whole number of at least 1, or {NATIVE!r}")
    return threads


def chosen(option: str | None = None) -> Policy:
    """The policy in force: the option's value, else the environment variable's, else one thread."""
    if option is not None:
        return Policy(parse(option), "--threads")
    if os.environ.get(ENVIRONMENT):
        return Policy(parse(os.environ[ENVIRONMENT]), ENVIRONMENT)
    return Policy(DEFAULT, "default")


def apply(policy: Policy) -> dict:
    """Put `policy` in force in this process and its future children; what is then in force (`in_force`)."""
    os.environ[ENVIRONMENT] = NATIVE if policy.threads is None else str(policy.threads)  # for child processes
    if policy.threads is not None:
        import threadpoolctl
        import torch

        for variable in CHILD_VARIABLES:
            os.environ[variable] = str(policy.threads)
        torch.set_num_threads(policy.threads)
        if torch.get_num_interop_threads() != policy.threads:
            try:
                torch.set_num_interop_threads(policy.threads)
            except RuntimeError:  # only possible before torch's first parallel work: `in_force` shows what stayed
                pass
        threadpoolctl.threadpool_limits(policy.threads)
    return in_force()


def in_force() -> dict:
    """The threads each library of this process may use now, as the libraries themselves report them."""
    import threadpoolctl
    import torch

    pools = {}
    for pool in threadpoolctl.threadpool_info():
        name = f"{pool['internal_api']} ({pool['prefix']})"
        pools[name] = max(pool["num_threads"], pools.get(name, 0))
    return {
        "torch intra-op": torch.get_num_threads(),
        "torch inter-op": torch.get_num_interop_threads(),
        **pools,
        "mlx cpu": MLX_CPU,
    }


def describe(policy: Policy, measured: dict) -> str:
    """One line for a header: the policy and what each library reports."""
    libraries = ", ".join(f"{name} {count}" for name, count in measured.items())
    return f"threads per process {policy}: {libraries}"


def departures(policy: Policy, measured: dict) -> list[str]:
    """The libraries that report another number of threads than the policy's, as ``name N``."""
    if policy.threads is None:
        return []
    return [f"{name} {count}" for name, count in measured.items() if isinstance(count, int) and count != policy.threads]


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N|native`` for a command-line entry point (the plugin has its own pytest option)."""
    parser.add_argument(
        "--threads",
        metavar="N",
        help=f"threads per process for torch, BLAS and OpenMP, or {NATIVE!r} (the libraries' "
        f"own defaults; default: ${ENVIRONMENT}, else {DEFAULT})",
    )


def apply_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Policy:
    """Put the policy `add_option`'s option chose in force (a usage error if it is not one); the policy."""
    try:
        policy = chosen(args.threads)
    except ValueError as error:
        parser.error(f"--threads / ${ENVIRONMENT}: {error}")
    apply(policy)
    return policy


def apply_inherited() -> None:
    """In a worker process: the policy its parent put in force (which `apply` left in the environment)."""
    apply(chosen())
