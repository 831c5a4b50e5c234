"""``flannel`` (and ``cloudroutes cni``): the flannel-compatible CNI meta-plugin.

ADD reads subnet.env, builds a delegate config (bridge and host-local by default, see
cni_delegate), saves it to ``<dataDir>/<containerID>`` and runs the delegate plugin from
CNI_PATH with it; the delegate's answer and exit status are the plugin's. DEL runs the
delegate's DEL with the saved config and removes it. CHECK, GC and STATUS succeed. Every failure
is CNI error JSON on stdout with exit status 1.

The runtime starts this process for every pod, so it imports only os, sys, ipaddress and the C
half of json (the delegate runs through posix_spawn, not subprocess): a pod's ADD costs the
interpreter's start and the delegate, little more (bench/cni_latency.py).
"""

from __future__ import annotations

import os
import sys

from cloudroutes.cni_delegate import NetConf, build_delegate, load_subnet_env, scratch_path
from cloudroutes.cni_json import (
    ERR_DECODING_FAILURE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_ENVIRONMENT,
    ERR_INVALID_NETWORK_CONFIG,
    CniError,
    decode,
    encode,
)

# typing costs the plugin process milliseconds it does not need at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import BinaryIO

    # (plugin path, file to give it as stdin, its environment) -> (exit status, its stdout)
    Runner = Callable[[str, str, dict[str, str]], tuple[int, bytes]]

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"

_ALL = {"ADD", "CHECK", "DEL", "GC", "STATUS"}
_CONTAINER = {"ADD", "CHECK", "DEL"}
# Which variables each command needs, as the CNI library's skel checks them.
_REQUIRED_ENV = (
    ("CNI_COMMAND", _ALL),
    ("CNI_CONTAINERID", _CONTAINER),
    ("CNI_NETNS", {"ADD", "CHECK"}),
    ("CNI_IFNAME", _CONTAINER),
    ("CNI_PATH", _ALL),
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_MAX_IFNAME = 15


class _Request:
    __slots__ = ("command", "container_id", "environ", "path")

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.command = environ.get("CNI_COMMAND", "")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.path = environ.get("CNI_PATH", "")


def main() -> int:
    """The executable's entry point: the process environment, stdin and stdout."""
    return run(os.environ, sys.stdin.buffer, sys.stdout.buffer)


def run(
    environ: Mapping[str, str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    runner: Runner | None = None,
) -> int:
    """Answer one CNI request; the exit status is returned, the answer written to stdout."""
    version = CURRENT_VERSION
    try:
        request = _request(environ)
        if request.command == "VERSION":
            stdout.write(_version_info())
            return 0
        data = stdin.read()
        conf = _network_config(data)
        given = conf.get("cniVersion")
        if isinstance(given, str) and given:
            version = given
        command = _COMMANDS.get(request.command)
        if command is None:
            raise CniError(ERR_INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {request.command}")
        return command(request, conf, stdout, runner or run_plugin)
    except CniError as err:
        stdout.write(err.render(version))
    except Exception as exc:
        # The runtime parses stdout: even a bug must answer CNI JSON, never a traceback.
        stdout.write(CniError(ERR_INTERNAL, f"internal error: {exc!r}").render(version))
    return 1


def _version_info() -> bytes:
    return encode({"cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS}) + b"\n"


def _request(environ: Mapping[str, str]) -> _Request:
    request = _Request(environ)
    missing = []
    for name, commands in _REQUIRED_ENV:
        value = environ.get(name, "")
        if not value:
            if request.command in commands or name == "CNI_COMMAND":
                missing.append(name)
        elif request.command in commands and name == "CNI_CONTAINERID":
            _check_container_id(value)
        elif request.command in commands and name == "CNI_IFNAME":
            _check_ifname(value)
    if missing:
        raise CniError(
            ERR_INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing"
        )
    return request


def _valid_name(name: str) -> bool:
    # CNI's rule for container IDs and network names; it also keeps IDs out of other
    # directories when used as a file name (no "/", no leading ".").
    return bool(name) and name[0] not in "_.-" and all(c in _NAME_CHARS for c in name)


def _check_container_id(value: str) -> None:
    if not _valid_name(value):
        raise CniError(ERR_INVALID_ENVIRONMENT, "invalid characters in containerID", value)


def _check_ifname(value: str) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > _MAX_IFNAME:
        raise CniError(
            ERR_INVALID_ENVIRONMENT,
            "interface name is too long",
            f"interface name should be less than {_MAX_IFNAME + 1} characters",
        )
    if value in (".", ".."):
        raise CniError(ERR_INVALID_ENVIRONMENT, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in value):
        raise CniError(
            ERR_INVALID_ENVIRONMENT, "interface name contains / or : or whitespace characters"
        )


def _network_config(data: bytes) -> dict[str, object]:
    try:
        conf = decode(data)
    except ValueError as exc:
        raise CniError(ERR_DECODING_FAILURE, f"error unmarshall network config: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(
            ERR_DECODING_FAILURE, "error unmarshall network config: it must be a JSON object"
        )
    name = conf.get("name")
    if name is not None and not isinstance(name, str):
        raise CniError(ERR_DECODING_FAILURE, 'error unmarshall network config: "name" not a string')
    if not name:
        raise CniError(ERR_INVALID_NETWORK_CONFIG, "missing network name")
    if not _valid_name(name):
        raise CniError(ERR_INVALID_NETWORK_CONFIG, "invalid characters found in network name", name)
    return conf


def _config_version(conf: dict[str, object]) -> str:
    version = conf.get("cniVersion")
    if version is not None and not isinstance(version, str):
        raise CniError(
            ERR_DECODING_FAILURE,
            'decoding version from network config: "cniVersion" must be a string',
        )
    return version or "0.1.0"


def _check_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        supported = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f'config is "{version}", plugin supports [{supported}]',
        )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = version.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise CniError(ERR_DECODING_FAILURE, f'invalid version "{version}"')
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def _add(request: _Request, conf: dict[str, object], stdout: BinaryIO, runner: Runner) -> int:
    _check_supported(_config_version(conf))
    netconf = NetConf(conf)
    delegate = build_delegate(netconf, load_subnet_env(netconf.subnet_file))
    data = encode(delegate)
    plugin = _find_plugin(str(delegate["type"]), request.path, "failed to delegate add: ")
    # Saved before the delegate runs: a failed ADD is followed by a DEL that needs it.
    saved = _save(netconf.data_dir, request.container_id, data)
    status, output = _delegate(runner, plugin, saved, request, "ADD")
    stdout.write(output)
    return status


def _del(request: _Request, conf: dict[str, object], stdout: BinaryIO, runner: Runner) -> int:
    _check_supported(_config_version(conf))
    try:
        netconf = NetConf(conf)
    except CniError as err:
        # flannel's DEL reports the netconf error without the ADD's prefix.
        err.msg = err.msg.removeprefix("failed to load flannel netconf file: ")
        raise
    path = scratch_path(netconf.data_dir, request.container_id)
    try:
        with open(path, "rb") as f:
            saved = decode(f.read())
    except FileNotFoundError:
        return 0  # Already deleted, or ADD never got this far: nothing to undo.
    except OSError as exc:
        raise CniError(ERR_INTERNAL, f"open {path}: {(exc.strerror or str(exc)).lower()}") from None
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("type", ""), str):
        # Unreadable: the delegate cannot be asked; drop the file so DEL is not stuck on it.
        _remove(path)
        return 0
    plugin = _find_plugin(str(saved.get("type", "")), request.path, "")
    status, output = _delegate(runner, plugin, path, request, "DEL")
    if status != 0:
        stdout.write(output)
        return status
    _remove(path)
    return 0


def _no_op_since(minimum: str) -> Callable[..., int]:
    """CHECK (0.4.0), GC and STATUS (1.1.0): accepted for a config version that has them."""

    def command(request: _Request, conf: dict[str, object], stdout: BinaryIO, _: Runner) -> int:
        version = _config_version(conf)
        if _version_tuple(version) < _version_tuple(minimum):
            raise CniError(
                ERR_INCOMPATIBLE_VERSION, f"config version does not allow {request.command}"
            )
        if _version_tuple(version) > _version_tuple(CURRENT_VERSION):
            raise CniError(
                ERR_INCOMPATIBLE_VERSION, f"plugin version does not allow {request.command}"
            )
        _check_supported(version)
        return 0

    return command


_COMMANDS: dict[str, Callable[[_Request, dict[str, object], BinaryIO, Runner], int]] = {
    "ADD": _add,
    "DEL": _del,
    "CHECK": _no_op_since("0.4.0"),
    "GC": _no_op_since("1.1.0"),
    "STATUS": _no_op_since("1.1.0"),
}


def _find_plugin(name: str, cni_path: str, prefix: str) -> str:
    if not name:
        raise CniError(ERR_INTERNAL, f"{prefix}no plugin name provided")
    if "/" in name:
        raise CniError(ERR_INTERNAL, f"{prefix}invalid plugin name: {name}")
    paths = [p for p in cni_path.split(":") if p]
    if not paths:
        raise CniError(ERR_INTERNAL, f"{prefix}no paths provided")
    for directory in paths:
        candidate = os.path.join(directory, name)
        try:
            if os.path.isfile(candidate):
                return candidate
        except ValueError:  # a NUL in CNI_PATH: not a path that can hold a plugin
            continue
    raise CniError(
        ERR_INTERNAL, f'{prefix}failed to find plugin "{name}" in path [{" ".join(paths)}]'
    )


def _save(data_dir: str, container_id: str, data: bytes) -> str:
    """Keep the delegate config for DEL: 0600 in a 0700 directory, atomically, fsynced."""
    path = scratch_path(data_dir, container_id)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        write_atomically(path, data, 0o600)
    except (OSError, ValueError) as exc:
        why = exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CniError(
            ERR_INTERNAL,
            f"failed to save the delegate config to {path}: {why}; "
            "dataDir must be a writable directory",
        ) from None
    return path


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` by ``data``: a reader sees the old file or the new one, whole.

    Raises OSError (or ValueError for a path with a NUL); no temporary file is left behind.
    """
    directory, name = os.path.split(path)
    # A leading dot: no container ID starts with one, so no kept config is ever taken for it.
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # exact, whatever the umask or a leftover temporary file
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except (OSError, ValueError):
        return  # Per the CNI spec DEL goes on when its own leftovers cannot be removed.


def _delegate(
    runner: Runner, plugin: str, stdin_path: str, request: _Request, command: str
) -> tuple[int, bytes]:
    """Run the delegate; its answer passes through, or becomes one CNI error if it gave none."""
    environ = dict(request.environ)
    environ["CNI_COMMAND"] = command
    verb = command.lower()
    try:
        status, output = runner(plugin, stdin_path, environ)
    except (OSError, ValueError) as exc:
        raise CniError(ERR_INTERNAL, f"failed to delegate {verb}: {plugin}: {exc}") from None
    if status == 0:
        return status, output
    try:
        answer = decode(output)
    except ValueError:
        answer = None
    if status > 0 and isinstance(answer, dict) and "code" in answer:
        return status, output
    how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
    said = output.decode("utf-8", errors="replace").strip()
    raise CniError(
        ERR_INTERNAL,
        f"failed to delegate {verb}: netplugin failed: {said!r}"
        if said
        else f"failed to delegate {verb}: netplugin failed with no error message: {how}",
    )


def run_plugin(plugin: str, stdin_path: str, environ: dict[str, str]) -> tuple[int, bytes]:
    """Run a CNI plugin with a file as its stdin; its stderr is ours, its stdout returned."""
    stdin_fd = os.open(stdin_path, os.O_RDONLY | os.O_CLOEXEC)
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(
            plugin,
            [plugin],
            environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
                (os.POSIX_SPAWN_DUP2, write_fd, 1),
            ],
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(stdin_fd)
        os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as output:
        while chunk := output.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


if __name__ == "__main__":
    sys.exit(main())
