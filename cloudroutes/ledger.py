"""The ledger: which cloud routes this cluster created, kept in etcd.

AWS routes carry no name or tag, so a route's owner cannot be read from the cloud; GCE and
Alibaba routes carry a marker, and are recorded here as well so every table follows one rule.

Keys: ``<etcd prefix>/cloudroutes/routes/<cluster>/<route table id>/<destination>``, where the
cluster name and table id are percent-encoded (``/`` becomes ``%2F``, so the default cluster
name, the etcd prefix itself, fits in one segment) and the destination is the CIDR with ``/``
written ``-`` (``10.5.3.0-24``, ``fc00::-64``: neither address family uses ``-``). The value is
JSON: ``{"destination", "target", "previous_target"?, "lease", "written", "by"}``.

The ownership rule (for the route tables): a route in a table is ours iff

1. its destination lies inside the Network, and
2. the ledger of that table has an entry for the destination, and
3. the route's observed target is the entry's ``target`` or its ``previous_target``, or the
   entry is ``confirmed``: its route was made (or adopted) and seen through, so a route of ours
   that someone pointed elsewhere by hand is still ours, and is repaired.

How the tables write it:

- create: record the entry, then create the route, then record it ``confirmed``. A process
  that dies in between leaves an unconfirmed entry and no route: the next pass creates the
  route. If someone else created a route there meanwhile, its target differs from the
  unconfirmed entry's: not ours (3), a conflict, left alone;
- retarget (ReplaceRoute): record the new target with the old one as ``previous_target``,
  then replace; a death in between leaves the old route still ours, and the next pass replaces
  it. Once replaced, the entry is recorded again without ``previous_target``;
- adopt (a route identical to a desired one, not in the ledger, e.g. flanneld's): record it;
- delete: delete the route, then forget the entry (also when the route was found absent). A
  death in between leaves an entry without a route, which the next pass forgets.

Everything read from etcd is untrusted: an entry that does not parse is skipped (its route then
counts as not ours, which never deletes anything) and reported once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any
from urllib.parse import quote

from pyetcd import transactions as etcd_ops

from cloudroutes.election import Deposed, Fence, TxnResult, transaction
from cloudroutes.errors import ConfigError
from cloudroutes.subnet.etcd_client import EtcdClient, KeyValue

log = logging.getLogger(__name__)

Destination = IPv4Network | IPv6Network

# etcd refuses a transaction of more than 128 operations (--max-txn-ops); a bigger batch is
# written in several, each fenced on its own.
TXN_OPS = 100
_MAX_VALUE = 4096  # bytes; an entry is about 200
_MAX_TEXT = 512  # characters of a target, lease or writer id
_MAX_SHOWN = 3  # unreadable entries named in one warning


@dataclass(frozen=True)
class LedgerEntry:
    """One route the cluster created (or adopted) in one table."""

    destination: Destination
    target: str  # the next hop as the cloud names it: eni-…, an instance URL, i-…
    lease: str = ""  # key of the subnet lease the route serves, e.g. 10.5.3.0-24
    by: str = ""  # the node or controller that wrote the entry
    written: float = field(default_factory=time.time)  # unix time
    previous_target: str | None = None  # set while a retarget to `target` is under way
    # Set once the route was made (or adopted): from then on the destination is ours whatever
    # it points at, so a route of ours that someone pointed elsewhere by hand is repaired.
    confirmed: bool = False

    def owns(self, observed_target: str) -> bool:
        """Rule 3: the observed route is the one this entry records, or the entry's route was
        made and someone has retargeted it since."""
        return self.confirmed or observed_target in (self.target, self.previous_target)


def within(destination: Destination, networks: Iterable[Destination]) -> bool:
    """Rule 1: the destination lies inside one of the cluster's networks."""
    return any(
        destination.version == network.version and destination.subnet_of(network)  # type: ignore[arg-type]
        for network in networks
    )


def entry_key(destination: Destination) -> str:
    return str(destination).replace("/", "-")


def parse_entry_key(text: str) -> Destination | None:
    """The destination of an entry key, or None unless it is exactly one entry_key() makes."""
    address, sep, length = text.rpartition("-")
    if not sep or not length.isdigit():
        return None
    try:
        destination = ip_network(f"{address}/{length}")
    except ValueError:
        return None
    return destination if entry_key(destination) == text else None


def ledger_path(prefix: str, cluster: str, table_id: str) -> str:
    """The etcd prefix (ending in ``/``) under which one table's entries live."""
    if not cluster or not table_id:
        raise ConfigError("a route ledger needs a cluster name and a route table id")
    return (
        f"{prefix.rstrip('/')}/cloudroutes/routes/"
        f"{quote(cluster, safe='')}/{quote(table_id, safe='')}/"
    )


def encode_entry(entry: LedgerEntry) -> bytes:
    value: dict[str, Any] = {"destination": str(entry.destination), "target": entry.target}
    if entry.previous_target is not None:
        value["previous_target"] = entry.previous_target
    value.update(lease=entry.lease, written=entry.written, by=entry.by)
    if entry.confirmed:
        value["confirmed"] = True
    return json.dumps(value, separators=(",", ":")).encode()


def decode_entry(destination: Destination, raw: bytes) -> LedgerEntry:
    """The entry stored under ``destination``'s key; ValueError saying what is wrong."""
    if len(raw) > _MAX_VALUE:
        raise ValueError(f"value of {len(raw)} bytes is too long")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("value is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("value is not a JSON object")
    if value.get("destination") != str(destination):
        raise ValueError(f"destination {value.get('destination')!r:.60} differs from the key")
    written = value.get("written", 0)
    if not isinstance(written, int | float) or isinstance(written, bool):
        raise ValueError("written is not a number")
    if not math.isfinite(written) or written < 0:
        raise ValueError("written is not a time")
    previous = value.get("previous_target")
    confirmed = value.get("confirmed", False)
    if not isinstance(confirmed, bool):
        raise ValueError("confirmed is not true or false")
    return LedgerEntry(
        destination=destination,
        target=_text(value.get("target"), "target"),
        lease=_text(value.get("lease", ""), "lease", empty=True),
        by=_text(value.get("by", ""), "by", empty=True),
        written=float(written),
        previous_target=None if previous is None else _text(previous, "previous_target"),
        confirmed=confirmed,
    )


def _text(value: Any, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    if not (empty or value) or len(value) > _MAX_TEXT or not value.isprintable():
        raise ValueError(f"{name} is not 1 to {_MAX_TEXT} printable characters")
    return value


class Ledger:
    """The ledger of one route table of one cluster. Not thread-safe: one reconciler uses it."""

    def __init__(self, client: EtcdClient, prefix: str, cluster: str, table_id: str) -> None:
        self.path = ledger_path(prefix, cluster, table_id)
        self.table_id = table_id
        self._client = client
        self._entries: dict[Destination, LedgerEntry] = {}
        self._revisions: dict[Destination, int] = {}  # mod revision of each entry as last seen
        self._reported: set[tuple[str, int]] = set()  # unreadable (key, mod revision) warned of

    def entries(self) -> dict[Destination, LedgerEntry]:
        """Read the whole ledger of the table (one range request) and remember it."""
        kvs, _ = self._client.get_prefix(self.path)
        entries: dict[Destination, LedgerEntry] = {}
        revisions: dict[Destination, int] = {}
        bad: list[tuple[KeyValue, str]] = []
        for kv in kvs:
            name = kv.key.removeprefix(self.path)
            destination = parse_entry_key(name)
            if destination is None:
                bad.append((kv, "the key is not a destination like 10.5.3.0-24"))
                continue
            try:
                entries[destination] = decode_entry(destination, kv.value)
            except ValueError as exc:
                bad.append((kv, str(exc)))
                continue
            revisions[destination] = kv.mod_revision
        self._report(bad)
        self._entries, self._revisions = entries, revisions
        return dict(entries)

    def get(self, destination: Destination) -> LedgerEntry | None:
        """The entry for ``destination`` as last read or written."""
        return self._entries.get(destination)

    def owns(
        self, destination: Destination, observed_target: str, networks: Iterable[Destination]
    ) -> bool:
        """The ownership rule, from the last read, for a route observed in the table.

        ``networks`` are the cluster's Network (and IPv6Network) from its network config.
        """
        entry = self._entries.get(destination)
        return within(destination, networks) and entry is not None and entry.owns(observed_target)

    def record(self, entries: Iterable[LedgerEntry], fence: Fence | None = None) -> None:
        """Write the entries, in one transaction per TXN_OPS of them.

        With a fence, each transaction also requires the fence's leader key to be the one it
        was created as: a deposed leader writes nothing and gets Deposed.
        """
        batch = {entry.destination: entry for entry in entries}
        for chunk in _chunks(list(batch.values())):
            puts = [etcd_ops.Put(self._key(e.destination), encode_entry(e)) for e in chunk]
            result = self._fenced(puts, fence)
            for entry in chunk:
                self._entries[entry.destination] = entry
                self._revisions[entry.destination] = result.revision

    def forget(
        self, destinations: Iterable[Destination], fence: Fence | None = None
    ) -> set[Destination]:
        """Delete the entries of ``destinations``; returns those left in place.

        An entry is only deleted if nobody rewrote it since this ledger last read or wrote
        it (a node may have taken the subnet again and recorded its new route meanwhile); those
        are returned and their next read tells what they are now.
        """
        kept: set[Destination] = set()
        for chunk in _chunks(list(dict.fromkeys(destinations))):
            ops = [self._delete_op(destination) for destination in chunk]
            result = self._fenced(ops, fence)
            for destination, response in zip(chunk, result.responses, strict=True):
                unchanged = response.WhichOneof("response") != "response_txn" or (
                    response.response_txn.succeeded
                )
                if not unchanged:
                    kept.add(destination)
                self._entries.pop(destination, None)
                self._revisions.pop(destination, None)
        return kept

    def _delete_op(self, destination: Destination) -> Any:
        key = self._key(destination)
        revision = self._revisions.get(destination)
        if revision is None:
            return etcd_ops.Delete(key)
        return etcd_ops.Txn([etcd_ops.Mod(key) == revision], [etcd_ops.Delete(key)], [])

    def _fenced(self, ops: list[Any], fence: Fence | None) -> TxnResult:
        if fence is None:
            return transaction(self._client, [], ops)
        fence.check()
        result = transaction(self._client, [fence.compare()], ops)
        if not result.succeeded:
            fence.end()
            raise Deposed(
                f"ledger {self.path}: not written, the leader key {fence.key} is no longer "
                "the one this leader created"
            )
        return result

    def _key(self, destination: Destination) -> str:
        return self.path + entry_key(destination)

    def _report(self, bad: list[tuple[KeyValue, str]]) -> None:
        new = [(kv, why) for kv, why in bad if (kv.key, kv.mod_revision) not in self._reported]
        self._reported = {(kv.key, kv.mod_revision) for kv, _ in bad}
        if not new:
            return
        named = "; ".join(
            f"{kv.key.removeprefix(self.path)[:60]!r}: {why}" for kv, why in new[:_MAX_SHOWN]
        )
        more = f" and {len(new) - _MAX_SHOWN} more" if len(new) > _MAX_SHOWN else ""
        log.warning(
            "route ledger %s: skipped %d unreadable entries (%s%s); their routes count as not "
            "ours and are left alone; delete or fix those keys",
            self.path,
            len(new),
            named,
            more,
        )


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), TXN_OPS):
        yield items[start : start + TXN_OPS]
