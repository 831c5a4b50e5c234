"""The lease table: snapshots and changes in, generations and notifications out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable


def lease(n: int, ip: str = "198.18.0.1") -> Lease:
    return Lease(subnet=IPv4Network(f"10.5.{n}.0/24"), attrs=LeaseAttrs(IPv4Address(ip)))


def counting(table: LeaseTable) -> list[int]:
    calls: list[int] = []
    table.subscribe(lambda: calls.append(1))
    return calls


def test_a_relist_that_finds_nothing_new_wakes_nobody() -> None:
    # The watch lists everything every few minutes as a safety net; an unchanged store must
    # not cost every reconciler a pass.
    table = LeaseTable()
    table.replace_all([lease(1), lease(2)], revision=10)
    calls = counting(table)
    _, generation = table.snapshot()
    table.replace_all([lease(2), lease(1)], revision=50)
    assert calls == []
    assert table.snapshot()[1] == generation
    assert table.changes_since(generation) is not None
    assert table.revision == 50


def test_a_relist_reports_exactly_what_it_changed() -> None:
    table = LeaseTable()
    table.replace_all([lease(1), lease(2)], revision=10)
    _, generation = table.snapshot()
    calls = counting(table)
    table.replace_all([lease(1, "198.18.0.9"), lease(3)], revision=20)
    assert calls == [1]
    changes = table.changes_since(generation)
    assert changes is not None
    assert changes.leases == {
        "10.5.1.0-24": lease(1, "198.18.0.9"),
        "10.5.2.0-24": None,
        "10.5.3.0-24": lease(3),
    }


def test_removing_an_unknown_lease_or_adding_the_same_one_changes_nothing() -> None:
    table = LeaseTable()
    table.replace_all([lease(1)], revision=10)
    _, generation = table.snapshot()
    calls = counting(table)
    table.apply(
        [LeaseEvent(EventType.REMOVED, lease(7)), LeaseEvent(EventType.ADDED, lease(1))], 11
    )
    assert calls == [] and table.snapshot()[1] == generation
    assert table.get("10.5.1.0-24") == lease(1) and len(table) == 1
