"""Diffing desired routes against observed owned routes into a plan."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from cloudroutes.routes import Action, Change, Destination, Plan, Route


def by_destination(routes: Iterable[Route]) -> dict[Destination, Route]:
    """One route per destination. Overlapping claims (two leases on one subnet, which a healthy
    store never holds) resolve to the smallest route, so every node picks the same one."""
    chosen: dict[Destination, Route] = {}
    for route in routes:
        held = chosen.get(route.destination)
        if held is None or route < held:
            chosen[route.destination] = route
    return chosen


def make_plan(desired: Iterable[Route], observed: Iterable[Route]) -> Plan:
    """Deletes first (they free quota), then replaces, then adds; each list sorted."""
    want = by_destination(desired)
    have: dict[Destination, list[Route]] = defaultdict(list)
    for route in observed:
        have[route.destination].append(route)

    deletes: list[Change] = []
    replaces: list[Change] = []
    adds: list[Change] = []
    for destination, present in have.items():
        target = want.get(destination)
        if target is None:
            deletes.extend(Change(Action.DELETE, r, current=r) for r in sorted(present))
            continue
        if target in present:
            extra = [r for r in present if r != target]
        else:
            present = sorted(present)
            replaces.append(Change(Action.REPLACE, target, current=present[0]))
            extra = present[1:]
        deletes.extend(Change(Action.DELETE, r, current=r) for r in sorted(extra))
    for destination, target in want.items():
        if destination not in have:
            adds.append(Change(Action.ADD, target))

    def order(change: Change) -> tuple[int, int, Route]:
        return (
            change.route.destination.version,
            int(change.route.destination.network_address),
            change.route,
        )

    return Plan(
        tuple(sorted(deletes, key=order) + sorted(replaces, key=order) + sorted(adds, key=order))
    )
