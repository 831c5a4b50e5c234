"""Benchmarks: each figure is printed next to a baseline measured in the same run.

A bench module defines ``run(short: bool) -> Iterable[Figure]``; ``python -m bench`` runs every
module of this package (``--short`` for CI). Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Figure:
    """One measurement, and the same work done by the baseline in the same run."""

    name: str
    value: float
    unit: str = "s"
    baseline: float | None = None
    baseline_name: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.value / self.baseline

    def __str__(self) -> str:
        text = f"{self.name}: {self.value:.4g} {self.unit}"
        ratio = self.ratio
        if self.baseline_name and self.baseline is not None:
            text += f" vs {self.baseline_name} {self.baseline:.4g} {self.unit}"
            if ratio is not None:
                text += f" = {ratio:.2f}x the baseline"
        return text


def best_of(
    repeat: int, work: Callable[[], object], setup: Callable[[], object] = lambda: None
) -> float:
    """The fastest of ``repeat`` timed runs of ``work``, each after an untimed ``setup``."""
    best = float("inf")
    for _ in range(repeat):
        setup()
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


class _Deletable(Protocol):
    def delete(self) -> None: ...


N = TypeVar("N", bound=_Deletable)


class Rounds(Generic[N]):
    """Fresh nodes (namespaces) for timed rounds; every node made is deleted at the end."""

    def __init__(self, make: Callable[[], N]) -> None:
        self._make = make
        self.made: list[N] = []
        self.node: N | None = None

    def fresh(self) -> None:
        self.node = self._make()
        self.made.append(self.node)

    def close(self) -> None:
        for node in self.made:
            node.delete()
