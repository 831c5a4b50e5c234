"""Fuzzed stdin and environment: the plugin always answers JSON, never a traceback.

The plugin runs in-process with a recording delegate runner that always succeeds, so every
error answer must have come before any delegate ran.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloudroutes.cni import run

COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"]
SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
SUBNET_KEYS = [
    "FLANNEL_NETWORK",
    "FLANNEL_SUBNET",
    "FLANNEL_IPV6_NETWORK",
    "FLANNEL_IPV6_SUBNET",
    "FLANNEL_MTU",
    "FLANNEL_IPMASQ",
]
DELEGATE_ANSWER = b'{"cniVersion":"0.3.1","ips":[]}'


class Place:
    """Fixed files the fuzzed config may point at, all under one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good_env = root / "good.env"
        self.good_env.write_text(SUBNET_ENV)
        self.fuzzed_env = root / "fuzzed.env"
        self.data_dir = root / "data"
        self.bin = root / "bin"
        self.bin.mkdir()
        for name in ("bridge", "ipvlan"):
            (self.bin / name).write_text("never run: the runner is recorded\n")


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Place]:
    yield Place(tmp_path_factory.mktemp("cni-fuzz"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def mostly(
    valid: st.SearchStrategy[object], other: st.SearchStrategy[object]
) -> st.SearchStrategy[object]:
    """``valid`` seven times in ten: enough requests get through to the delegate."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < 7 else other)


cidrs = st.sampled_from(
    ["10.1.0.0/16", "10.1.17.1/24", "fc00::/48", "fc00::1/64", "1.2.3.4", "x/8", "10.0.0.0/33", ""]
)
routes = st.lists(
    st.fixed_dictionaries(
        {"dst": mostly(cidrs, json_values)},
        optional={
            "gw": mostly(st.sampled_from(["10.1.17.1", "::1", "bad", ""]), json_values),
            "mtu": json_values,
            "table": json_values,
        },
    ),
    max_size=3,
)
delegates = st.fixed_dictionaries(
    {},
    optional={
        "type": mostly(st.sampled_from(["bridge", "ipvlan", "missing"]), json_values),
        "name": json_values,
        "ipam": json_values,
        "mtu": json_values,
        "ipMasq": json_values,
        "isGateway": json_values,
        "hairpinMode": json_values,
    },
)


@st.composite
def netconfs(draw: st.DrawFn, place: Place) -> dict[str, object]:
    conf = draw(
        st.fixed_dictionaries(
            {
                "name": mostly(
                    st.just("cni-flannel"), st.sampled_from(["", "bad name", "a/b"]) | json_values
                ),
                "cniVersion": mostly(
                    st.sampled_from(["0.3.1", "0.4.0", "1.0.0"]),
                    st.sampled_from(["0.1", "2.0.0", "x"]) | json_values,
                ),
            },
            optional={
                "type": st.just("flannel") | json_values,
                "delegate": mostly(delegates, json_values),
                "ipam": mostly(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "type": json_values,
                            "routes": mostly(routes, json_values),
                            "ranges": json_values,
                        },
                    ),
                    json_values,
                ),
                "runtimeConfig": json_values,
                "capabilities": json_values,
                "dns": json_values,
            },
        )
    )
    # Files only where the test put them: the fuzzer must not write around the machine.
    conf["subnetFile"] = draw(
        mostly(
            st.just(str(place.good_env)),
            st.sampled_from([str(place.fuzzed_env), str(place.root / "none.env"), None]),
        )
    )
    conf["dataDir"] = str(place.data_dir)
    return conf


@st.composite
def environments(draw: st.DrawFn, place: Place) -> dict[str, str]:
    environ = {
        "CNI_COMMAND": draw(
            mostly(st.sampled_from(["ADD", "ADD", "ADD", *COMMANDS]), st.text(max_size=8))
        ),
        "CNI_PATH": draw(
            mostly(st.just(f"/nonexistent:{place.bin}"), st.sampled_from(["", "\x00", "relative"]))
        ),
    }
    for name, valid in (
        ("CNI_CONTAINERID", "pod-1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ):
        value = draw(
            mostly(
                st.just(valid),
                st.none() | st.text(max_size=20) | st.sampled_from(["", "..", "a:b", "../x"]),
            )
        )
        if value is not None:
            environ[name] = value
    return environ


def answer_of(environ: dict[str, str], stdin: bytes) -> tuple[int, bytes, list[str]]:
    ran: list[str] = []

    def runner(plugin: str, stdin_path: str, env: dict[str, str]) -> tuple[int, bytes]:
        ran.append(env["CNI_COMMAND"])
        Path(stdin_path).read_bytes().decode("utf-8")  # what the delegate reads is UTF-8
        return 0, DELEGATE_ANSWER if env["CNI_COMMAND"] == "ADD" else b""

    out = io.BytesIO()
    status = run(environ, io.BytesIO(stdin), out, runner)
    return status, out.getvalue(), ran


def strict_json(raw: bytes) -> object:
    def refuse(name: str) -> object:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def check_answer(status: int, raw: bytes, ran: list[str]) -> None:
    if status != 0:
        assert status == 1
        answer = strict_json(raw)
        assert isinstance(answer, dict)
        assert set(answer) == {"cniVersion", "code", "msg", "details"}
        assert isinstance(answer["code"], int) and isinstance(answer["msg"], str)
        assert not str(answer["msg"]).startswith("internal error"), answer["msg"]
        assert ran == []  # refused input never reaches a delegate
    elif ran == ["ADD"]:
        assert raw == DELEGATE_ANSWER
    elif raw:
        assert set(strict_json(raw)) == {"cniVersion", "supportedVersions"}  # type: ignore[arg-type]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stdin=st.binary(max_size=200), data=st.data())
def test_any_bytes_on_stdin(place: Place, stdin: bytes, data: st.DataObject) -> None:
    environ = data.draw(environments(place))
    check_answer(*answer_of(environ, stdin))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_network_config(place: Place, data: st.DataObject) -> None:
    lines = data.draw(
        st.lists(
            st.sampled_from(SUBNET_KEYS).flatmap(lambda k: cidrs.map(lambda v: f"{k}={v}"))
            | st.text(max_size=30),
            max_size=6,
        )
    )
    place.fuzzed_env.write_text("\n".join(lines), errors="surrogatepass")
    conf = data.draw(netconfs(place))
    environ = data.draw(environments(place))
    status, raw, ran = answer_of(environ, json.dumps(conf).encode())
    event(f"status {status}, ran {ran}")
    check_answer(status, raw, ran)
    if ran == ["ADD"]:
        saved = strict_json((place.data_dir / environ["CNI_CONTAINERID"]).read_bytes())
        assert isinstance(saved, dict)
        assert saved["name"] == conf["name"]
