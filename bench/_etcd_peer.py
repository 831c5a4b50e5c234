"""An etcd client that runs inside a lab namespace, for the agent benchmarks.

The bench process cannot talk to the lab's etcd itself: etcd listens inside its own namespace,
and gRPC opens its sockets on threads of its own, which would stay in the bench's namespace.
So this small program is started there with ``ip netns exec`` and driven over a pipe.

``python -m bench._etcd_peer client ENDPOINT`` reads one JSON command a line on stdin and
answers each with one JSON line. ``python -m bench._etcd_peer watch ENDPOINT PREFIX`` watches
a prefix and prints ``<time> <key>`` for every event (the floor of watch latency, as a bare
watcher in the agent's namespace sees it). Every time is ``time.monotonic()``: one clock for
every process of the machine, so the bench subtracts it from its own readings.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pyetcd
from pyetcd import etcdrpc

from cloudroutes.subnet.etcd_client import parse_endpoint

# etcd's default --max-txn-ops: the most puts one transaction may carry.
TXN_OPS = 128
# Grants in flight at once; etcd refuses far more with "too many requests".
WINDOW = 512


def connect(endpoint: str) -> pyetcd.Etcd3Client:
    host, port = parse_endpoint(endpoint)
    return pyetcd.client(host=host, port=port, timeout=30)


def grant(client: pyetcd.Etcd3Client, count: int, ttl: int) -> list[int]:
    """``count`` etcd leases, granted a window at a time on the one connection."""
    stub = client.leasestub
    ids: list[int] = []
    for start in range(0, count, WINDOW):
        futures = [
            stub.LeaseGrant.future(etcdrpc.LeaseGrantRequest(TTL=ttl), 30)
            for _ in range(min(WINDOW, count - start))
        ]
        ids += [future.result().ID for future in futures]
    return ids


def put_all(client: pyetcd.Etcd3Client, items: list[list[Any]]) -> None:
    """[key, value, lease id] items, TXN_OPS puts per transaction, one transaction after another."""
    put = client.transactions.put
    for start in range(0, len(items), TXN_OPS):
        ops = [put(key, value, lease=lease) for key, value, lease in items[start : start + TXN_OPS]]
        client.transaction(compare=[], success=ops, failure=[])


def timed(work: Callable[[], object]) -> dict[str, float]:
    started = time.monotonic()
    work()
    return {"start": started, "end": time.monotonic()}


def serve(endpoint: str) -> None:
    client = connect(endpoint)
    commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "grant": lambda c: {"ids": grant(client, c["count"], c["ttl"])},
        "put_all": lambda c: timed(lambda: put_all(client, c["items"])),
        "put": lambda c: timed(lambda: client.put(c["key"], c["value"], lease=c["lease"])),
        "delete": lambda c: timed(lambda: client.delete(c["key"])),
        "delete_prefix": lambda c: timed(lambda: client.delete_prefix(c["prefix"])),
    }
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = commands[command["op"]](command)
        except Exception as exc:  # the bench shows it; this process keeps serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


def watch(endpoint: str, prefix: str) -> None:
    client = connect(endpoint)
    lock = threading.Lock()

    def seen(response: Any) -> None:
        now = time.monotonic()
        if isinstance(response, BaseException):
            print(f"error {response}", flush=True)
            return
        with lock:
            for event in response.events:
                print(f"{now:.6f} {event.key.decode()}", flush=True)

    client.add_watch_prefix_callback(prefix, seen)
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes the pipe


def main(argv: list[str]) -> None:
    mode, endpoint, *rest = argv
    if mode == "client":
        serve(endpoint)
    else:
        watch(endpoint, rest[0])


if __name__ == "__main__":
    main(sys.argv[1:])
