"""Where a study's cases come from, reproducibly, and how its work is spread over processes.

A study asks for N distinct cases of a family in a dtype. They are drawn by Hypothesis in chunks
of `CHUNK` draws (N if fewer); chunk k of a study with seed s is Hypothesis run under
``@seed(s * 1_000_003 + k)`` with the generate phase only, so the same seed and N (with the same
Hypothesis version and the same code: Hypothesis now and then draws a constant it found in the project's
own modules) give the same cases, and chunks can run in any order on any number of processes.
Hypothesis repeats some draws (its generation starts from simple ones and mutates them): a case is
counted, and checked, once per chunk, and the study takes chunks 0, 1, ... until it has N distinct cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import date
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from conformance import threads
from foundation import memo

CHUNK = 500
"""Draws per Hypothesis run: small enough to spread over processes, large enough to amortise start-up."""


def chunk_size(cases: int) -> int:
    """The draws per chunk of a study that wants `cases` cases (a small study draws no more than it needs)."""
    return max(1, min(CHUNK, cases))


KINDS = ("drawn", "extreme")
"""``drawn``: the cases the suite itself draws (`Family.study_cases`, the dev profile's sizes); ``extreme``:
those of `studies.extremes`, which Hypothesis would rarely reach by itself."""


def strategy(
    family: str, dtype_name: str, kind: str, base: str = "float", adapter_dtype: str | None = None
) -> st.SearchStrategy:
    """A study's cases: `kind` of `KINDS` on a base of `conformance.families.BASES` (a quantized base's
    mode is drawn, each of `foundation.quantization.KINDS` alike; extreme cases have float bases); with
    `adapter_dtype`, only those whose adapter has that dtype."""
    cases = _strategy(family, dtype_name, kind, base)
    if adapter_dtype is None:
        return cases
    return cases.filter(lambda case: case.adapter_dtype.name == adapter_dtype)


def _strategy(family: str, dtype_name: str, kind: str, base: str) -> st.SearchStrategy:
    from conformance.families import FAMILIES
    from foundation import profiles
    from foundation.dtypes import BY_NAME
    from foundation.quantization import KINDS as QUANTIZATIONS
    from studies import extremes

    dtype = BY_NAME[dtype_name]
    if kind == "extreme":
        return extremes.cases_for(family, dtype)
    settings.load_profile(profiles.DEFAULT)  # the dev profile's sizes, whatever profile loaded before
    described = FAMILIES[family]
    if base == "quantized":
        return st.sampled_from(QUANTIZATIONS).flatmap(lambda mode: described.quantized_study_cases(dtype, mode))
    if base == "conv1d":
        return described.on("conv1d").cases(dtype)
    return described.study_cases(dtype)


def result_name(
    family: str,
    base: str,
    dtype: str,
    kind: str,
    adapter_dtype: str | None = None,
    seed: int = 0,
    subject: str | None = None,
) -> str:
    """A study's result file: ``linear-float32-drawn.json``, ``linear-quantized-float32-drawn.json``,
    ``linear-bfloat16-float32-adapters-drawn.json``; a seed other than 0 is named (``linear-float32-drawn-seed2.json``)
    so that a further seed adds a study instead of overwriting the first, and so is a subject other than the
    family's default (``mlx_lm.LoRALinear-linear-bfloat16-drawn.json``), so that a release's study stands beside the
    catalogue's."""
    adapters = [] if adapter_dtype is None else [f"{adapter_dtype}-adapters"]
    seeded = [] if seed == 0 else [f"seed{seed}"]
    named = [] if subject is None else [subject.replace(":", "_")]
    return "-".join([*named, family, *([] if base == "float" else [base]), dtype, *adapters, kind, *seeded]) + ".json"


def base_option(base: str, adapter_dtype: str | None = None) -> list[str]:
    """The ``--base`` (and ``--adapter-dtype``) a study's command line needs (none for the defaults, so older
    commands read as they did)."""
    adapters = [] if adapter_dtype is None else [f"--adapter-dtype {adapter_dtype}"]
    return ([] if base == "float" else [f"--base {base}"]) + adapters


def check_usage(
    parser: argparse.ArgumentParser,
    family: str,
    kind: str,
    base: str,
    dtype: str = "",
    adapter_dtype: str | None = None,
) -> None:
    """A one-line usage error for a study the suite has no cases of."""
    from conformance.families import FAMILIES

    if not FAMILIES[family].checks_on(base):
        parser.error(f"the suite has no {family} layer on a {base} base (see conformance.families)")
    if kind == "extreme" and base != "float":
        parser.error(f"extreme cases have float bases only, not {base}")
    if adapter_dtype is not None and (not FAMILIES[family].float32_adapters or dtype == adapter_dtype):
        parser.error(
            f"the suite draws no {adapter_dtype} adapters on a {dtype} base of {family} "
            "(only on a half-precision base, for the families with float32_adapters)"
        )


def chunk_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def draw_chunk(cases: st.SearchStrategy, seed: int, index: int, size: int, visit: Callable[[object], None]) -> None:
    """Call `visit` on up to `size` cases of chunk `index` (fewer if Hypothesis rejects too many draws)."""

    @hypothesis_seed(chunk_seed(seed, index))
    @settings(
        max_examples=size,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case):
        visit(case)

    run()


@dataclass(frozen=True)
class Study:
    """One study of one family in one dtype: ``study(k)`` measures its chunk k (picklable, for workers)."""

    measure: Callable[[Study, int], dict]
    """A module-level function ``(study, chunk) -> findings``, whose findings list the chunk's case `keys`."""
    subject: str
    family: str
    dtype: str
    kind: str
    seed: int
    size: int
    """Draws per chunk."""
    base: str = "float"
    adapter_dtype: str | None = None
    """Only cases whose adapter has this dtype, where given."""
    checks: tuple[str, ...] = ()
    """Only these of the family's checks, each on every case, where given."""

    def __call__(self, chunk: int) -> dict:
        return self.measure(self, chunk)

    def each_distinct(self, chunk: int, visit: Callable[[object, int], None]) -> list[str]:
        """Call ``visit(case, index)`` once per distinct case of chunk `chunk`; return their keys."""
        seen: dict[str, None] = {}

        def once(case) -> None:
            identity = key(case.describe())
            if identity not in seen:
                seen[identity] = None
                visit(case, len(seen) - 1)
                memo.forget(case)

        from conformance.families import FAMILIES
        from subjects.known import resolve

        cases = strategy(self.family, self.dtype, self.kind, self.base, self.adapter_dtype)
        cases = FAMILIES[self.family].cases_for(resolve(self.subject), cases)
        draw_chunk(cases, self.seed, chunk, self.size, once)
        return sorted(seen)


def study_of(args: argparse.Namespace, measure: Callable[[Study, int], dict], subject: str) -> Study:
    """The study a command line of `add_case_options` asks for, measured by `measure`."""
    return Study(
        measure,
        subject,
        args.family,
        args.dtype,
        args.kind,
        args.seed,
        chunk_size(args.cases),
        args.base,
        args.adapter_dtype,
        tuple(getattr(args, "check", None) or ()),
    )


def mlx_device() -> str:
    """The MLX device a study runs on: its default (Metal where there is one)."""
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.Device(mx.gpu) else "cpu"


def study_document(study: str, subject: str, args: argparse.Namespace, seconds: float, command: str) -> dict:
    """What every study of drawn cases records first: which study of which subject, family, base, dtype, kind
    and seed, how long it took, when, in what environment and by which command."""
    return {
        "study": study,
        "subject": subject,
        "family": args.family,
        "base": args.base,
        "dtype": args.dtype,
        "adapter_dtype": getattr(args, "adapter_dtype", None) or args.dtype,
        "kind": args.kind,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "measured": date.today().isoformat(),
        "environment": environment(),
        "command": command,
    }


def environment() -> dict:
    """What a study measured with: the packages' versions, MLX's device and the machine."""
    import platform

    from subjects.known import versions

    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    policy = threads.chosen().threads or threads.NATIVE
    return {**versions(), "device": mlx_device(), "machine": machine, "threads": policy}


def distinct(results: list[dict]) -> int:
    """How many distinct cases the chunks' findings cover."""
    return len({key for result in results for key in result["keys"]})


def add_case_options(parser: argparse.ArgumentParser, default_cases: int) -> None:
    """The options every study of drawn cases takes."""
    from conformance.families import BASES

    parser.add_argument(
        "--cases", type=int, default=default_cases, help="at least this many distinct cases (default: %(default)s)"
    )
    parser.add_argument("--kind", choices=KINDS, default="drawn", help="which cases (default: %(default)s)")
    parser.add_argument("--base", choices=BASES, default="float", help="what the layer wraps (default: %(default)s)")
    parser.add_argument(
        "--adapter-dtype",
        choices=("float32",),
        help="only cases whose adapter has this dtype: float32 adapters on a half-precision base (default: as drawn)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the study's seed: same seed, same cases (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
    threads.add_option(parser)


def run(study: Study, cases: int, workers: int, progress: Callable[[list[dict]], str]) -> list[dict]:
    """The findings of the chunks that give `cases` distinct cases, with a progress line on stderr."""
    start = time.perf_counter()

    def show(results: list[dict]) -> None:
        print(
            f"\r{distinct(results)} cases{progress(results)}, {time.perf_counter() - start:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    results = until_enough(study, lambda results: distinct(results) >= cases, workers, show)
    print(file=sys.stderr)
    return results


def writable(parser: argparse.ArgumentParser, path: Path) -> Path:
    """`path`, once it is known to be writable: a one-line usage error now, not after hours of measuring."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as error:
        parser.error(f"cannot write {path}: {error}")
    if not existed:
        path.unlink()
    return path


def key(description: dict) -> str:
    """A case's identity: a digest of its parameters (the arrays follow from them)."""
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


T = TypeVar("T")
R = TypeVar("R")


def _worker_threads() -> None:
    """A worker process takes its parent's thread policy (`conformance.threads`) before its first case."""
    from conformance import threads

    threads.apply_inherited()


def spread(work: Callable[[T], R], tasks: list[T], workers: int) -> Iterator[R]:
    """``map(work, tasks)`` over `workers` processes (in this one if 1), results in order."""
    if workers <= 1:
        yield from map(work, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_threads) as pool:
        yield from pool.map(work, tasks, chunksize=4)


def until_enough(
    work: Callable[[int], R], enough: Callable[[list[R]], bool], workers: int, progress: Callable[[list[R]], None]
) -> list[R]:
    """The results of ``work(0), work(1), ... work(K - 1)`` for the smallest K that is `enough`.

    The chunks run on `workers` processes (in this one if 1); chunks that finish beyond K are dropped,
    so which cases a study covers does not depend on timing.
    """
    results: dict[int, R] = {}

    def done() -> list[R] | None:
        prefix = []
        for index in range(len(results) + 1):
            if index not in results:
                return None
            prefix.append(results[index])
            if enough(prefix):
                return prefix
        return None

    if workers <= 1:
        index = 0
        while (finished := done()) is None:
            results[index] = work(index)
            progress(list(results.values()))
            index += 1
        return finished
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_threads) as pool:
        running = {pool.submit(work, index): index for index in range(workers)}
        submitted = workers
        while (finished := done()) is None:
            future = next(as_completed(running))
            results[running.pop(future)] = future.result()
            progress(list(results.values()))
            running[pool.submit(work, submitted)] = submitted
            submitted += 1
        for future in running:
            future.cancel()
        return finished
