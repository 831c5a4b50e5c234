"""Diffing desired entries against what a table holds into a plan. Pure logic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cloudroutes.routes import (
    Action,
    Change,
    Entry,
    EntryKey,
    EntryState,
    Foreign,
    Observed,
    Plan,
)


@dataclass(frozen=True)
class Diff:
    """A plan, and the wanted keys it leaves alone because someone else holds them."""

    plan: Plan
    conflicts: dict[EntryKey, Foreign] = field(default_factory=dict)


def make_plan(
    desired: Mapping[EntryKey, Entry],
    owned: Mapping[EntryKey, Observed],
    foreign: Mapping[EntryKey, Foreign] | None = None,
    keys: Iterable[EntryKey] | None = None,
) -> Diff:
    """The changes for ``keys`` (every key when None).

    An owned entry equal to the wanted one is left alone, also while pending (it was accepted;
    asking again would make it twice); a broken or different one is replaced. A wanted key
    held by a foreign entry is adopted when the table allows it and the entry is exactly the
    wanted one, and is otherwise a conflict: reported, never changed.
    """
    foreign = foreign or {}
    scope = set(desired) | set(owned) if keys is None else set(keys)
    deletes: list[Change] = []
    replaces: list[Change] = []
    adds: list[Change] = []
    conflicts: dict[EntryKey, Foreign] = {}
    for key in scope:
        want = desired.get(key)
        have = owned.get(key)
        if want is None:
            if have is not None:
                deletes.append(Change(Action.DELETE, have.entry, current=have.entry))
            continue
        if have is not None:
            if have.entry != want or have.state is EntryState.BROKEN:
                replaces.append(Change(Action.REPLACE, want, current=have.entry))
            continue
        held = foreign.get(key)
        if held is None:
            adds.append(Change(Action.ADD, want))
        elif held.adoptable and held.entry == want:
            replaces.append(Change(Action.ADOPT, want, current=held.entry))
        else:
            conflicts[key] = held

    def order(change: Change) -> tuple[object, ...]:
        return change.entry.sort_key()

    return Diff(
        Plan(
            tuple(
                sorted(deletes, key=order) + sorted(replaces, key=order) + sorted(adds, key=order)
            )
        ),
        conflicts,
    )
