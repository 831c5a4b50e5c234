"""``cloudroutes install-cni``: put the ``flannel`` CNI plugin where the container runtime
looks for plugins (``/opt/cni/bin`` by default), as flannel's install-cni init container does.

The runtime starts the plugin once per pod ADD and DEL, so its start is the pod's cost. The
installed file starts the interpreter with ``-IS``: no site (no ``.pth`` file runs, so an
editable install's import hooks cost nothing), no user site, no ``PYTHON*`` variable from the
runtime's environment, and no plugin directory on ``sys.path``. The package is found at the
path it had when it was installed; install again after moving or upgrading it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cloudroutes
from cloudroutes.cni import write_atomically
from cloudroutes.errors import ConfigError

DEFAULT_BIN_DIR = "/opt/cni/bin"
PLUGIN_NAME = "flannel"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bin-dir",
        default=DEFAULT_BIN_DIR,
        help=f"the runtime's CNI plugin directory, one of its CNI_PATH ({DEFAULT_BIN_DIR})",
    )


def plugin_source(python: str, package_root: str) -> str:
    """The plugin executable: a script that imports nothing but the plugin."""
    for what, value in (("interpreter", python), ("package", package_root)):
        if (
            not value
            or any(c in value for c in "\n\r\0")
            or (what == "interpreter" and " " in value)
        ):
            raise ConfigError(
                f"install-cni: the {what} path {value!r} cannot go into a script; "
                "install cloudroutes under a path without spaces or line breaks"
            )
    return (
        f"#!{python} -IS\n"
        f"# The flannel CNI plugin of cloudroutes {cloudroutes.__version__}, written by\n"
        "# `cloudroutes install-cni`; run it again after moving or upgrading cloudroutes.\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        "from cloudroutes.cni import main\n"
        "sys.exit(main())\n"
    )


def install_plugin(bin_dir: str | Path, python: str = sys.executable) -> Path:
    """Write ``<bin_dir>/flannel`` atomically (a runtime starting it mid-install sees the old
    file or the new one) and return its path."""
    directory = Path(bin_dir)
    if not directory.is_dir():
        raise ConfigError(
            f"install-cni: --bin-dir {directory} is not a directory; create it, or pass the "
            "directory your runtime's CNI_PATH names (containerd: bin_dir in its CNI config)"
        )
    root = str(Path(cloudroutes.__file__).resolve().parent.parent)
    target = directory / PLUGIN_NAME
    try:
        write_atomically(str(target), plugin_source(python, root).encode(), 0o755)
    except OSError as exc:
        raise ConfigError(
            f"install-cni: cannot write {target}: {exc.strerror}; run as a user who may write "
            f"to {directory}"
        ) from None
    return target


def run(args: argparse.Namespace) -> int:
    print(f"installed {install_plugin(args.bin_dir)}")
    return 0
