"""The flannel CNI plugin: flannel's delegate config, subnet.env rules, commands and errors.

The plugin runs in-process (cloudroutes.cni.run) with its environment, stdin and stdout given;
delegates are small shell scripts in CNI_PATH that record what they were given.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudroutes.cni import SUPPORTED_VERSIONS, run
from cloudroutes.cni_delegate import (
    NetConf,
    build_delegate,
    load_subnet_env,
    parse_cidr,
    parse_subnet_env,
)
from cloudroutes.cni_json import CniError, decode, encode

# flannel-io/cni-plugin's golden delegates (flannel_linux_test.go), compared as JSON there.
GOLDEN_IPV4 = '{"ipMasq":false,"ipam":{"routes":[{"dst":"10.1.0.0/16"}],"ranges":[[{"subnet":"10.1.17.0/24"}]],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'
GOLDEN_IPV6 = '{"ipMasq":false,"ipam":{"routes":[{"dst":"fc00::/48"}],"ranges":[[{"subnet":"fc00::/64"}]],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'
GOLDEN_DUAL = '{"ipMasq":false,"ipam":{"routes":[{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}],"ranges":[[{"subnet":"10.1.17.0/24"}],[{"subnet":"fc00::/64"}]],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'
# The same, byte for byte as Go's json.Marshal writes it (map keys sorted, no spaces).
GO_BYTES_IPV4 = b'{"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'
GO_BYTES_DUAL = b'{"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}],[{"subnet":"fc00::/64"}]],"routes":[{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'

IPV4_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
IPV6_ENV = "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
DUAL_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"

# A delegate that keeps its stdin and environment, then answers like bridge (or as told).
RECORDING_PLUGIN = """#!/bin/sh
cat > "$0.stdin"
env > "$0.env"
if [ -n "$FAKE_ANSWER" ]; then printf '%s' "$FAKE_ANSWER"; else printf '{"cniVersion":"0.3.1","ips":[]}'; fi
exit "${FAKE_STATUS:-0}"
"""


def delegate_for(env_text: str, netconf: dict[str, object], tmp_path: Path) -> dict[str, object]:
    subnet_file = tmp_path / "subnet.env"
    subnet_file.write_text(env_text)
    return build_delegate(NetConf(netconf), load_subnet_env(str(subnet_file)))


@pytest.mark.parametrize(
    ("env_text", "golden", "go_bytes"),
    [
        (IPV4_ENV, GOLDEN_IPV4, GO_BYTES_IPV4),
        (IPV6_ENV, GOLDEN_IPV6, None),
        (DUAL_ENV, GOLDEN_DUAL, GO_BYTES_DUAL),
    ],
    ids=["ipv4", "ipv6", "dual-stack"],
)
def test_golden_delegate(
    env_text: str, golden: str, go_bytes: bytes | None, tmp_path: Path
) -> None:
    delegate = delegate_for(env_text, {"name": "cni-flannel", "type": "flannel"}, tmp_path)
    assert delegate == json.loads(golden)
    if go_bytes is not None:
        assert encode(delegate) == go_bytes


class Plugin:
    """The plugin with a subnet.env, a data dir and a recording delegate in CNI_PATH."""

    def __init__(self, tmp_path: Path, env_text: str = IPV4_ENV) -> None:
        self.subnet_file = tmp_path / "run" / "subnet.env"
        self.subnet_file.parent.mkdir()
        self.subnet_file.write_text(env_text)
        self.data_dir = tmp_path / "data" / "flannel"
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.delegate = self.bin / "bridge"
        self.delegate.write_text(RECORDING_PLUGIN)
        self.delegate.chmod(0o755)
        self.environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_CONTAINERID": "pod-1",
            "CNI_NETNS": "/var/run/netns/pod-1",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": f"{tmp_path / 'empty'}:{self.bin}",
        }

    def conf(self, **extra: object) -> dict[str, object]:
        return {
            "cniVersion": "0.3.1",
            "name": "cni-flannel",
            "type": "flannel",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir),
            **extra,
        }

    def call(
        self, command: str, conf: object = None, stdin: bytes | None = None, **environ: str
    ) -> tuple[int, dict[str, object] | None, bytes]:
        data = stdin if stdin is not None else json.dumps(conf or self.conf()).encode()
        out = io.BytesIO()
        status = run({**self.environ, "CNI_COMMAND": command, **environ}, io.BytesIO(data), out)
        raw = out.getvalue()
        return status, (json.loads(raw) if raw else None), raw

    def delegate_stdin(self) -> bytes:
        return Path(f"{self.delegate}.stdin").read_bytes()

    def delegate_env(self) -> dict[str, str]:
        lines = Path(f"{self.delegate}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    @property
    def saved(self) -> Path:
        return self.data_dir / "pod-1"


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def test_add_saves_the_delegate_and_prints_its_answer(plugin: Plugin) -> None:
    status, answer, _ = plugin.call("ADD", plugin.conf(runtimeConfig={"portMappings": []}))
    assert (status, answer) == (0, {"cniVersion": "0.3.1", "ips": []})
    expected = json.loads(GOLDEN_IPV4) | {
        "cniVersion": "0.3.1",
        "runtimeConfig": {"portMappings": []},
    }
    assert json.loads(plugin.saved.read_bytes()) == expected
    assert plugin.delegate_stdin() == plugin.saved.read_bytes()
    env = plugin.delegate_env()
    assert env["CNI_COMMAND"] == "ADD"
    assert (env["CNI_CONTAINERID"], env["CNI_IFNAME"]) == ("pod-1", "eth0")
    assert stat.S_IMODE(plugin.saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(plugin.data_dir.stat().st_mode) == 0o700
    assert os.listdir(plugin.data_dir) == ["pod-1"]


def test_delegate_defaults_give_way_to_the_users(tmp_path: Path) -> None:
    conf = {
        "name": "cni-flannel",
        "cniVersion": "1.0.0",
        "delegate": {"type": "ipvlan", "ipMasq": True, "mtu": 1400, "master": "eth0"},
        "ipam": {"type": "static", "routes": [{"dst": "192.168.0.5/16", "gw": "10.1.17.1"}]},
    }
    delegate = delegate_for(IPV4_ENV, conf, tmp_path)
    assert delegate == {
        "type": "ipvlan",
        "ipMasq": True,
        "mtu": 1400,
        "master": "eth0",
        "name": "cni-flannel",
        "cniVersion": "1.0.0",
        # Not bridge: no isGateway. Given routes first (address kept, as Go's ParseCIDR does).
        "ipam": {
            "type": "static",
            "ranges": [[{"subnet": "10.1.17.0/24"}]],
            "routes": [{"dst": "192.168.0.5/16", "gw": "10.1.17.1"}, {"dst": "10.1.0.0/16"}],
        },
    }


def test_ipmasq_false_makes_the_bridge_masquerade(tmp_path: Path) -> None:
    env_text = IPV4_ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false")
    assert delegate_for(env_text, {"name": "n"}, tmp_path)["ipMasq"] is True


def test_route_struct_keeps_field_order_and_drops_unknown_keys(tmp_path: Path) -> None:
    routes = [{"scope": 0, "gw": "::ffff:10.0.0.1", "dst": "10.9.0.0/16", "mtu": 0, "x": 1}]
    delegate = delegate_for(IPV4_ENV, {"name": "n", "ipam": {"routes": routes}}, tmp_path)
    assert (
        b'"routes":[{"dst":"10.9.0.0/16","gw":"10.0.0.1","scope":0},{"dst":"10.1.0.0/16"}]'
        in encode(delegate)
    )


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        (
            "FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16,10.1.0.0/16\n",
            ["10.1.0.0/16", "192.168.0.0/16"],
        ),
        ("FLANNEL_NETWORK=10.1.2.3/16\n", ["10.1.0.0/16"]),
    ],
)
def test_subnet_env_network_lists(text: str, wanted: list[str]) -> None:
    env = parse_subnet_env(
        text + "FLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=x\n", "f"
    )
    assert env.networks == wanted
    assert env.subnet == "10.1.17.0/24"
    assert (env.mtu, env.ipmasq) == (1450, False)


@pytest.mark.parametrize(
    ("text", "network", "address"),
    [
        ("10.1.17.1/24", "10.1.17.0/24", "10.1.17.1/24"),
        ("FC00:0:0:0::1/64", "fc00::/64", "fc00::1/64"),
        ("1:0:2:3:4:5:6:7/128", "1:0:2:3:4:5:6:7/128", "1:0:2:3:4:5:6:7/128"),
        # Go prints mapped addresses as IPv4 (a mapped network with the mask's IPv4 part), and
        # the deprecated IPv4-compatible form in hex, not the C library's ::1.2.3.4.
        ("::ffff:10.1.2.3/120", "10.1.2.0/24", "10.1.2.3/120"),
        ("::1.2.3.4/128", "::102:304/128", "::102:304/128"),
    ],
)
def test_cidrs_print_as_go_prints_them(text: str, network: str, address: str) -> None:
    assert (parse_cidr(text, masked=True), parse_cidr(text, masked=False)) == (network, address)


@pytest.mark.parametrize(
    "text",
    ["010.1.2.3/8", "1.2.3/24", "1.2.3.4/33", "::/129", "fe80::1%eth0/64", "1.2.3.4/+8",
     "1.2.3.4 /8", "\uff11.2.3.4/8", "1.2.3.4/\u0663", "1.2.3.4\x00/8", "1.2.3.4"],
)  # fmt: skip
def test_cidrs_go_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cidr(text, masked=True)
    assert str(caught.value) == f"invalid CIDR address: {text}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "f is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ",
        ),
        (
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPMASQ=true\n",
            "f is missing FLANNEL_MTU",
        ),
        (
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1\n",
            "invalid CIDR address: 10.1.17.1",
        ),
        ("FLANNEL_NETWORK=10.1.0.0/255.255.0.0\n", "invalid CIDR address: 10.1.0.0/255.255.0.0"),
        ("FLANNEL_MTU=-1\n", 'FLANNEL_MTU: invalid value "-1"'),
        ("FLANNEL_MTU=4294967296\n", 'FLANNEL_MTU: invalid value "4294967296"'),
    ],
)
def test_subnet_env_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_subnet_env(text, "f")
    assert str(caught.value) == message


def test_missing_subnet_env_is_flannels_error(plugin: Plugin) -> None:
    plugin.subnet_file.unlink()
    status, answer, _ = plugin.call("ADD")
    assert status == 1
    assert answer == {
        "cniVersion": "0.3.1",
        "code": 999,
        "msg": f"failed to load flannel 'subnet.env' file: open {plugin.subnet_file}: "
        "no such file or directory. Check the flannel pod log for this node.",
        "details": "",
    }
    assert not plugin.data_dir.exists()
    assert not Path(f"{plugin.delegate}.stdin").exists()


@pytest.mark.parametrize(
    ("delegate", "message"),
    [
        (
            {"name": "x"},
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
        ),
        ({"ipam": {}}, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"),
        ({"type": 5}, "'delegate' dictionary, if present, must have (string) 'type' field"),
    ],
)
def test_delegate_fields_flannel_owns_are_refused(
    plugin: Plugin, delegate: dict[str, object], message: str
) -> None:
    status, answer, _ = plugin.call("ADD", plugin.conf(delegate=delegate))
    assert status == 1
    assert answer is not None and (answer["code"], answer["msg"]) == (999, message)
    assert not plugin.saved.exists()


@pytest.mark.parametrize(
    ("command", "stdin", "environ", "code", "msg"),
    [
        ("ADD", b"{not json", {}, 6, "error unmarshall network config: "),
        ("ADD", b"[1]", {}, 6, "error unmarshall network config: it must be a JSON object"),
        ("ADD", b'{"cniVersion":"0.3.1"}', {}, 7, "missing network name"),
        ("ADD", b'{"name":"a/b"}', {}, 7, "invalid characters found in network name"),
        ("ADD", b'{"name":"n","cniVersion":"9.9.9"}', {}, 1, "incompatible CNI versions"),
        (
            "ADD",
            b'{"name":"n","dataDir":5}',
            {},
            999,
            'failed to load flannel netconf file: failed to load netconf: "dataDir" must be a string, not number',
        ),
        (
            "ADD",
            b'{"name":"n"}',
            {"CNI_IFNAME": ""},
            4,
            "required env variables [CNI_IFNAME] missing",
        ),
        (
            "ADD",
            b'{"name":"n"}',
            {"CNI_CONTAINERID": "../etc"},
            4,
            "invalid characters in containerID",
        ),
        (
            "ADD",
            b'{"name":"n"}',
            {"CNI_IFNAME": "a-very-long-ifname"},
            4,
            "interface name is too long",
        ),
        ("FROB", b'{"name":"n"}', {}, 4, "unknown CNI_COMMAND: FROB"),
        ("", b'{"name":"n"}', {}, 4, "required env variables [CNI_COMMAND] missing"),
        (
            "CHECK",
            b'{"name":"n","cniVersion":"0.3.1"}',
            {},
            1,
            "config version does not allow CHECK",
        ),
        (
            "DEL",
            b'{"name":"n","ipam":[]}',
            {},
            999,
            'failed to load netconf: "ipam" must be an object, not array',
        ),
    ],
)
def test_errors_are_cni_json(
    plugin: Plugin, command: str, stdin: bytes, environ: dict[str, str], code: int, msg: str
) -> None:
    status, answer, raw = plugin.call(command, stdin=stdin, **environ)
    assert status == 1
    assert answer is not None
    assert set(answer) == {"cniVersion", "code", "msg", "details"}
    assert answer["code"] == code
    assert str(answer["msg"]).startswith(msg)
    assert b"Traceback" not in raw
    assert not Path(f"{plugin.delegate}.stdin").exists()


def test_missing_delegate_plugin(plugin: Plugin) -> None:
    status, answer, _ = plugin.call("ADD", plugin.conf(delegate={"type": "macvlan"}))
    assert status == 1
    assert answer is not None
    assert answer["msg"] == (
        'failed to delegate add: failed to find plugin "macvlan" in path '
        f"[{plugin.environ['CNI_PATH'].replace(':', ' ')}]"
    )
    assert not plugin.saved.exists()  # nothing for a DEL to undo


def test_delegate_error_passes_through_unchanged(plugin: Plugin) -> None:
    error = b'{"cniVersion":"0.3.1","code":11,"msg":"try again later","details":"lock"}'
    status, _, raw = plugin.call("ADD", FAKE_ANSWER=error.decode(), FAKE_STATUS="3")
    assert (status, raw) == (3, error)
    assert plugin.saved.exists()  # the runtime's DEL after a failed ADD needs it


def test_delegate_failing_without_json(plugin: Plugin) -> None:
    status, answer, _ = plugin.call("ADD", FAKE_ANSWER="segfault", FAKE_STATUS="2")
    assert status == 1
    assert answer is not None
    assert answer["msg"] == "failed to delegate add: netplugin failed: 'segfault'"


def test_del_runs_the_delegate_then_forgets(plugin: Plugin) -> None:
    assert plugin.call("ADD")[0] == 0
    saved = plugin.saved.read_bytes()
    assert plugin.call("DEL", CNI_NETNS="")[:2] == (0, None)
    assert plugin.delegate_env()["CNI_COMMAND"] == "DEL"
    assert plugin.delegate_stdin() == saved
    assert not plugin.saved.exists()
    Path(f"{plugin.delegate}.stdin").unlink()
    assert plugin.call("DEL")[:2] == (0, None)  # a second DEL succeeds, without the delegate
    assert not Path(f"{plugin.delegate}.stdin").exists()


def test_del_keeps_the_config_when_the_delegate_fails(plugin: Plugin) -> None:
    assert plugin.call("ADD")[0] == 0
    error = '{"code":11,"msg":"busy"}'
    status, answer, _ = plugin.call("DEL", FAKE_ANSWER=error, FAKE_STATUS="1")
    assert (status, answer) == (1, {"code": 11, "msg": "busy"})
    assert plugin.saved.exists()


def test_del_of_an_unreadable_config_succeeds(plugin: Plugin) -> None:
    plugin.data_dir.mkdir(parents=True)
    plugin.saved.write_text("{half a conf")
    assert plugin.call("DEL")[:2] == (0, None)
    assert not Path(f"{plugin.delegate}.stdin").exists()


def test_check_is_a_no_op_and_version_lists_versions(plugin: Plugin) -> None:
    assert plugin.call("CHECK", plugin.conf(cniVersion="1.0.0"))[:2] == (0, None)
    status, answer, _ = plugin.call("VERSION", stdin=b"not even json", CNI_PATH="")
    assert (status, answer) == (
        0,
        {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)},
    )


def test_data_dir_that_cannot_be_written(plugin: Plugin, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, answer, _ = plugin.call("ADD", plugin.conf(dataDir=str(blocker / "d")))
    assert status == 1
    assert answer is not None
    assert str(answer["msg"]).startswith(
        f"failed to save the delegate config to {blocker}/d/pod-1: "
    )


@pytest.mark.parametrize(
    ("value", "go"),
    [
        ({"b": 1.0, "a": "<&>\u2028"}, b'{"a":"\\u003c\\u0026\\u003e\\u2028","b":1}'),
        ([1e21, 1e-7, 1.5e-5, 2.5], b"[1e+21,1e-7,0.000015,2.5]"),
        ("caf\u00e9\n\x01", b'"caf\xc3\xa9\\n\\u0001"'),
    ],
)
def test_go_marshal(value: object, go: bytes) -> None:
    assert encode(value) == go


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b"1e400", b"[" * 100_000])
def test_go_unmarshal_refuses(text: bytes) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_error_json_survives_any_text() -> None:
    rendered = CniError(999, "bad \ud800 input", "\x00").render("0.3.1")
    assert json.loads(rendered)["details"] == "\x00"


def test_plugin_process_imports_nothing_heavy() -> None:
    heavy = [
        "cloudroutes.cli",
        "cloudroutes.config",
        "cloudroutes.subnet_env",
        "pyroute2",
        "grpc",
        "prometheus_client",
        "subprocess",
        "dataclasses",
        "typing",
        "ipaddress",  # as much import time as all the rest: the plugin parses with _socket
        "json.decoder",  # it imports re: the plugin uses json's C scanner directly
    ]
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import cloudroutes.cni; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    loaded = subprocess.run(
        # As install-cni starts it: no site, whose .pth hooks import what they like.
        [sys.executable, "-IS", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "[]"


def test_main_reads_the_process_environment_and_stdin(
    plugin: Plugin, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    from cloudroutes.cni import main

    for name, value in {**plugin.environ, "CNI_COMMAND": "ADD"}.items():
        monkeypatch.setenv(name, value)
    stdin = io.TextIOWrapper(io.BytesIO(json.dumps(plugin.conf()).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main() == 0
    assert json.loads(capsysbinary.readouterr().out) == {"cniVersion": "0.3.1", "ips": []}
    assert plugin.saved.exists()


def test_cloudroutes_cni_is_the_same_plugin(plugin: Plugin) -> None:
    cli = Path(sys.executable).parent / "cloudroutes"
    environ = {**plugin.environ, "CNI_COMMAND": "ADD"}
    plugin.subnet_file.unlink()
    done = subprocess.run(
        [str(cli), "cni"],
        input=json.dumps(plugin.conf()).encode(),
        env=environ,
        capture_output=True,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["msg"].startswith("failed to load flannel 'subnet.env' file: ")
    assert done.stderr == b""
