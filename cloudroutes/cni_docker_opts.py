"""``cloudroutes docker-opts``: Docker daemon options from subnet.env.

The options and the env file are those of flannel's ``mk-docker-opts.sh``, so a Docker unit
written for flannel works unchanged::

    DOCKER_OPT_BIP="--bip=10.1.17.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=false"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_OPTS=" --bip=10.1.17.1/24 --ip-masq=false --mtu=1472"

Without ``-d`` and without ``-i``/``-c`` the options alone are printed, for
``dockerd $(cloudroutes docker-opts)``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from cloudroutes.cni import write_atomically
from cloudroutes.errors import ConfigError
from cloudroutes.subnet_env import DEFAULT_PATH, read_subnet_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """mk-docker-opts.sh's options (``-f`` is also ``--subnet-file``, as for the agent)."""
    parser.add_argument(
        "-f", "--subnet-file", default=DEFAULT_PATH, help=f"subnet.env to read ({DEFAULT_PATH})"
    )
    parser.add_argument(
        "-d", dest="docker_env", metavar="FILE", help="write a Docker env file instead of printing"
    )
    parser.add_argument(
        "-i", dest="individual", action="store_true", help="each option as its own DOCKER_OPT_ var"
    )
    parser.add_argument(
        "-c", dest="combined", action="store_true", help="all options in one variable (-k)"
    )
    parser.add_argument(
        "-m", dest="no_ip_masq", action="store_true", help="leave --ip-masq out (older Docker)"
    )
    parser.add_argument(
        "-k", dest="key", default="DOCKER_OPTS", help="the combined variable (DOCKER_OPTS)"
    )


def docker_options(values: Mapping[str, str], *, ip_masq: bool = True) -> list[tuple[str, str]]:
    """(variable, option) pairs in mk-docker-opts.sh's order; absent values are left out.

    Docker must not masquerade what flannel already masquerades (FLANNEL_IPMASQ=true), and must
    when flannel does not.
    """
    options = []
    if values.get("FLANNEL_SUBNET"):
        options.append(("DOCKER_OPT_BIP", f"--bip={values['FLANNEL_SUBNET']}"))
    masq = values.get("FLANNEL_IPMASQ")
    if masq and ip_masq:
        if masq not in ("true", "false"):
            raise ConfigError(
                f"FLANNEL_IPMASQ={masq} is not true or false; fix or rewrite the subnet file"
            )
        options.append(("DOCKER_OPT_IPMASQ", f"--ip-masq={'false' if masq == 'true' else 'true'}"))
    if values.get("FLANNEL_MTU"):
        options.append(("DOCKER_OPT_MTU", f"--mtu={values['FLANNEL_MTU']}"))
    return options


def render_env(
    options: list[tuple[str, str]],
    *,
    individual: bool,
    combined: bool,
    key: str = "DOCKER_OPTS",
    existing: str = "",
) -> str:
    """The env file; ``existing`` (the key's value in our environment) leads, as in the script."""
    lines = [f'{name}="{option}"' for name, option in options] if individual else []
    if combined:
        joined = (f"{existing} " if existing else "") + "".join(f" {o}" for _, o in options)
        lines.append(f'{key}="{joined}"')
    return "".join(f"{line}\n" for line in lines)


def run(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    values = read_subnet_env(args.subnet_file)
    if not values:
        missing = not Path(args.subnet_file).exists()
        raise ConfigError(
            f"subnet file {args.subnet_file} "
            + ("does not exist" if missing else "has no FLANNEL_ values")
            + ": the agent writes it once this node holds a lease; start 'cloudroutes agent' "
            "or give the right --subnet-file"
        )
    options = docker_options(values, ip_masq=not args.no_ip_masq)
    if not args.docker_env and not (args.individual or args.combined):
        print(" ".join(option for _, option in options))
        return 0
    both = not (args.individual or args.combined)
    text = render_env(
        options,
        individual=args.individual or both,
        combined=args.combined or both,
        key=args.key,
        existing=environ.get(args.key, ""),
    )
    if not args.docker_env:
        print(text, end="")
        return 0
    target = Path(args.docker_env)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomically(str(target), text.encode(), 0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the Docker env file {target}: {exc.strerror}; "
            "give a writable path with -d"
        ) from None
    return 0
