"""``cloudroutes <verb>``: agent, config get|set, leases, plan, demo.

Every error is one line on stderr (what, where, how to fix) and exit status 1; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudroutes.errors import CloudroutesError, ConfigError
from cloudroutes.flags import AGENT_FLAGS, ETCD_FLAGS, add_flags, resolve

log = logging.getLogger("cloudroutes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudroutes", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    agent = verbs.add_parser("agent", help="the node daemon (takes flanneld's flags)")
    add_flags(agent, ETCD_FLAGS + AGENT_FLAGS)

    config = verbs.add_parser("config", help="read or write the network config in etcd")
    config_verbs = config.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    get = config_verbs.add_parser("get", help="print the network config")
    add_flags(get, ETCD_FLAGS)
    put = config_verbs.add_parser("set", help="validate, then write the network config")
    put.add_argument("file", help="net-conf JSON file, or - for stdin")
    add_flags(put, ETCD_FLAGS)

    leases = verbs.add_parser("leases", help="list every subnet lease with its expiry")
    add_flags(leases, ETCD_FLAGS)

    plan = verbs.add_parser("plan", help="show what a reconcile would change, changing nothing")
    add_flags(plan, ETCD_FLAGS + AGENT_FLAGS)

    demo = verbs.add_parser("demo", help="a local cluster in network namespaces")
    demo.add_argument("--backend", default="host-gw")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--keep", action="store_true", help="wait for Ctrl-C before cleaning up")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        # pyroute2 and grpc are chatty at INFO about things the operator cannot act on.
        logging.getLogger("pyroute2").setLevel(logging.WARNING)
    try:
        return _VERBS[args.verb](args)
    except CloudroutesError as exc:
        if args.debug:
            raise
        print(f"cloudroutes: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _etcd_source(values: dict[str, Any]) -> Any:
    from cloudroutes.subnet.etcd import EtcdLeaseSource, EtcdSettings

    # The --etcd-* flags are EtcdSettings' fields under the same names; it checks them all.
    etcd = {
        name: values[f"etcd_{name}"]
        for name in ("endpoints", "prefix", "keyfile", "certfile", "cafile", "username", "password")
    }
    return EtcdLeaseSource(
        EtcdSettings(
            renew_margin=values.get("subnet_lease_renew_margin", 60),
            lease_ttl=values.get("subnet_lease_ttl", 86400),
            **etcd,
        )
    )


def _agent(args: argparse.Namespace) -> int:
    from cloudroutes.agent import Agent, AgentOptions

    values = resolve(args, ETCD_FLAGS + AGENT_FLAGS)
    if values["kube_subnet_mgr"]:
        raise ConfigError("--kube-subnet-mgr is not supported yet; use etcd (--etcd-endpoints)")
    # AgentOptions' fields are named after the flags they come from.
    options = AgentOptions(**{f.name: values[f.name] for f in fields(AgentOptions)})
    return Agent(options, _etcd_source(values)).run()


def _config(args: argparse.Namespace) -> int:
    source = _etcd_source(resolve(args, ETCD_FLAGS))
    try:
        if args.config_verb == "get":
            text = source.get_config_text()
            if text is None:
                raise ConfigError(
                    "no network config in etcd yet; write one with 'cloudroutes config set FILE'"
                )
            print(text)
            return 0
        text = sys.stdin.read() if args.file == "-" else _read(args.file)
        source.put_config(text)
        print(f"network config written to {source.config_key}")
        return 0
    finally:
        source.close()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _leases(args: argparse.Namespace) -> int:
    source = _etcd_source(resolve(args, ETCD_FLAGS))
    try:
        leases = source.list_leases()
    finally:
        source.close()
    now = datetime.now(UTC)
    rows = [("SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES")]
    for lease in sorted(leases, key=lambda x: x.key):
        rows.append(
            (
                str(lease.subnet or "-"),
                str(lease.ipv6_subnet or "-"),
                str(lease.public_ip),
                lease.backend_type or "-",
                _expires(lease.expiration, now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _expires(expiration: datetime | None, now: datetime) -> str:
    if expiration is None:
        return "never (reservation)"
    left = int((expiration - now).total_seconds())
    if left <= 0:
        return "expired"
    hours, rest = divmod(left, 3600)
    return f"in {hours}h{rest // 60:02d}m{rest % 60:02d}s"


def _plan(args: argparse.Namespace) -> int:
    from cloudroutes.dry_run import plan_for_node

    values = resolve(args, ETCD_FLAGS + AGENT_FLAGS)
    source = _etcd_source(values)
    try:
        plans = plan_for_node(source, values)
    finally:
        source.close()
    for table, plan in plans:
        if not plan:
            print(f"route table {table}: nothing to change")
            continue
        print(f"route table {table}: {len(plan)} change(s)")
        for change in plan:
            print(f"  {change}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cloudroutes.demo import run_demo

    return run_demo(backend=args.backend, nodes=args.nodes, keep=args.keep)


_VERBS = {
    "agent": _agent,
    "config": _config,
    "leases": _leases,
    "plan": _plan,
    "demo": _demo,
}
