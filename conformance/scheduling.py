"""Which tests run together: the subjects of one check and dtype draw the same cases, so they share them.

The parametrizations of a generated test that differ only in their subject, such as
``test_forward[mlx_vlm.LoRALinear-float32]`` and ``test_forward[mlx_lm.LoRALinear-float32]``, are a *group*:
the plugin seeds them alike (a derandomized test from the group's name, a randomized one from the run's seed),
so they draw the same cases. It runs a group one test after another in one process and keeps its cases for
the group's time (`foundation.memo.share_cases`): a case is built, and its oracle and reference computed, once
for every subject. Under xdist's ``load`` distribution (``-n``), `CheckGroupScheduling` sends each group to
one worker whole.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling


def check_group(nodeid: str) -> str:
    """The group of a test: its id without the subject, the first of its parameters
    (``conformance/test_linear.py::test_forward[float32]``); a test without parameters is a group of its own."""
    start, end = nodeid.find("["), nodeid.rfind("]")
    if start < 0 or end < start:
        return nodeid
    subject, separator, rest = nodeid[start + 1 : end].partition("-")
    return f"{nodeid[:start]}[{rest}]" if separator else nodeid


def group_order(nodeids: list[str]) -> dict[str, int]:
    """Each group's place: where its first test is among `nodeids`."""
    order: dict[str, int] = {}
    for nodeid in nodeids:
        order.setdefault(check_group(nodeid), len(order))
    return order


class CheckGroupScheduling(LoadScopeScheduling):
    """xdist's load distribution, a group of tests (`check_group`) at a time, as ``--dist loadscope`` sends a module."""

    def _split_scope(self, nodeid: str) -> str:
        return check_group(nodeid)
