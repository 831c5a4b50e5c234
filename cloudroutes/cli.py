"""``cloudroutes <verb>``: the node agent, the cloud controller and the operator's commands.

Verbs: agent, controller, config get|set, leases, plan, demo, cni, install-cni, docker-opts.

Every error is one line on stderr (what, where, how to fix) and exit status 1 (2 for a
command line that does not parse, as Go's flag package does); a traceback appears only with
``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudroutes import cni_docker_opts, cni_install
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import CloudroutesError, ConfigError
from cloudroutes.flags import (
    AGENT_FLAGS,
    CONTROLLER_FLAGS,
    ETCD_FLAGS,
    add_flags,
    add_version,
    given,
    ignored_notices,
    resolve,
)

log = logging.getLogger("cloudroutes")

# Flags the CLI itself hands to the lease source rather than to the agent.
_SOURCE_FLAGS = {f.dest for f in ETCD_FLAGS} | {
    "subnet_lease_renew_margin",
    "subnet_lease_ttl",
    "kube_subnet_mgr",
}


class _Parser(argparse.ArgumentParser):
    """Go's flag package takes no abbreviations, and a bad command line is one line here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"cloudroutes: error: {message}; see '{self.prog} --help'\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cloudroutes", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    add_version(parser)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    agent = verbs.add_parser("agent", help="the node daemon (takes flanneld's flags)")
    add_flags(agent, ETCD_FLAGS + AGENT_FLAGS)
    add_version(agent)

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
    add_version(plan)

    controller = verbs.add_parser(
        "controller",
        help="a cluster-mode candidate for cloud backends: programs every lease's cloud route "
        "while elected; takes no lease and changes nothing on this machine",
    )
    add_flags(controller, ETCD_FLAGS + CONTROLLER_FLAGS)

    demo = verbs.add_parser("demo", help="a local cluster in network namespaces")
    demo.add_argument("--backend", default="vxlan")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--keep", action="store_true", help="wait for Ctrl-C before cleaning up")
    demo.add_argument(
        "--mode",
        choices=("node", "cluster"),
        help="aws-vpc only: node (each agent writes its own route, default) or cluster "
        "(one elected agent writes every route)",
    )

    verbs.add_parser(
        "cni",
        help="the flannel CNI plugin (CNI_* environment, network config on stdin); "
        "also installed as 'flannel' for CNI_PATH",
    )
    cni_install.add_arguments(
        verbs.add_parser(
            "install-cni", help="install the flannel CNI plugin into the runtime's plugin directory"
        )
    )
    cni_docker_opts.add_arguments(
        verbs.add_parser("docker-opts", help="Docker daemon options from subnet.env")
    )
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
    from cloudroutes.subnet_env import check_subnet_file

    values = resolve(args, ETCD_FLAGS + AGENT_FLAGS)
    if values["kube_subnet_mgr"]:
        raise ConfigError("--kube-subnet-mgr is not supported yet; use etcd (--etcd-endpoints)")
    check_subnet_file(values["subnet_file"])
    # AgentOptions' fields are named after the flags they come from.
    names = {f.name for f in fields(AgentOptions)}
    set_flags = given(args, AGENT_FLAGS)
    for notice in ignored_notices(set_flags):
        log.warning("%s", notice)
    for flag in set_flags:
        if not flag.ignored and flag.dest not in names | _SOURCE_FLAGS:
            log.warning("--%s is not implemented yet and is ignored", flag.name)
    options = AgentOptions(**{name: values[name] for name in names})
    return Agent(options, _etcd_source(values)).run()


def _controller(args: argparse.Namespace) -> int:
    from cloudroutes.controller import Controller

    values = resolve(args, ETCD_FLAGS + CONTROLLER_FLAGS)
    controller = Controller(
        _etcd_source(values), healthz_ip=values["healthz_ip"], healthz_port=values["healthz_port"]
    )
    return controller.run()


def _config(args: argparse.Namespace) -> int:
    values = resolve(args, ETCD_FLAGS)
    # A file is read and checked before etcd is contacted: its errors name the file.
    data = None if args.config_verb == "get" or args.file == "-" else _read(args.file)
    if data is not None:
        check_config(data, args.file)
    source = _etcd_source(values)
    try:
        if args.config_verb == "get":
            text = source.get_config_text()
            if text is None:
                raise ConfigError(
                    "no network config in etcd yet; write one with 'cloudroutes config set FILE'"
                )
            print(text)
            return 0
        if data is None:
            data = sys.stdin.buffer.read()
            check_config(data, f"etcd {source.config_key}")
        source.put_config(data.decode())
        print(f"network config written to {source.config_key}")
        return 0
    finally:
        source.close()


def check_config(data: str | bytes, where: str) -> NetworkConfig:
    """What the agent checks in a network config, so `config set` refuses the same things."""
    from cloudroutes.backend import backend_factory, backend_names

    config = parse_config(data, source=where)
    if config.backend_type not in backend_names():
        try:
            backend_factory(config.backend_type)
        except ConfigError as exc:
            raise ConfigError(f"invalid network config ({where}): {exc}") from None
    return config


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read: {exc.strerror}; "
            "give flannel's net-conf JSON file, or - for stdin"
        ) from None


def _leases(args: argparse.Namespace) -> int:
    source = _etcd_source(resolve(args, ETCD_FLAGS))
    try:
        leases = source.list_leases()
        refusal = _lease_vetting(source)
    finally:
        source.close()
    now = datetime.now(UTC)
    header = ["SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES"]
    rows = [[" ", *header, "REFUSED"] if refusal else header]
    for lease in sorted(leases, key=_address_order):
        row = [
            str(lease.subnet or "-"),
            str(lease.ipv6_subnet or "-"),
            str(lease.public_ip),
            lease.backend_type or "-",
            _expires(lease.expiration, now),
        ]
        if refusal:
            why = refusal(lease)
            row = ["!" if why else " ", *row, why or ""]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _address_order(lease: Any) -> tuple[int, int, int]:
    """IPv4 subnets in address order, then IPv6-only leases in address order."""
    if lease.subnet is not None:
        return (0, int(lease.subnet.network_address), lease.subnet.prefixlen)
    if lease.ipv6_subnet is not None:
        return (1, int(lease.ipv6_subnet.network_address), lease.ipv6_subnet.prefixlen)
    return (2, 0, 0)


def _lease_vetting(source: Any) -> Callable[[Any], str | None] | None:
    """Why the agents would refuse to route each lease, judged by the network config alone.

    None (no REFUSED column) without a valid config, or in a build without lease vetting.
    """
    try:
        from cloudroutes.lease_vetting import LeaseVetting
    except ImportError:
        return None
    text = source.get_config_text()
    if text is None:
        return None
    try:
        config = parse_config(text, source=f"etcd {source.config_key}")
    except ConfigError as exc:
        log.warning("%s; leases are listed without checking them", exc)
        return None
    return LeaseVetting(config).refusal


def _expires(expiration: datetime | None, now: datetime) -> str:
    if expiration is None:
        return "never (reservation)"
    left = int((expiration - now).total_seconds())
    if left <= 0:
        return "expired"
    hours, rest = divmod(left, 3600)
    return f"in {hours}h{rest // 60:02d}m{rest % 60:02d}s"


def _plan(args: argparse.Namespace) -> int:
    from cloudroutes.dry_run import plan_for_node, render

    values = resolve(args, ETCD_FLAGS + AGENT_FLAGS)
    source = _etcd_source(values)
    try:
        previews = plan_for_node(source, values)
    finally:
        source.close()
    for line in render(previews):
        print(line)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cloudroutes.demo import run_demo

    return run_demo(backend=args.backend, nodes=args.nodes, keep=args.keep, mode=args.mode)


def _cni(args: argparse.Namespace) -> int:
    from cloudroutes.cni import main as cni_main

    return cni_main()


_VERBS = {
    "agent": _agent,
    "config": _config,
    "leases": _leases,
    "plan": _plan,
    "controller": _controller,
    "demo": _demo,
    "cni": _cni,
    "install-cni": cni_install.run,
    "docker-opts": cni_docker_opts.run,
}
