"""A real etcd (Debian's etcd-server), one member or three, on loopback or in a namespace."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cloudroutes.lab.process import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EtcdTLS:
    ca: Path
    cert: Path
    key: Path


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """``size`` members on loopback; ``tls`` turns on client TLS with client-cert auth."""

    size: int = 1
    tls: EtcdTLS | None = None
    host: str = "127.0.0.1"
    # Run the members inside this network namespace (the demo's etcd "machine").
    netns: str | None = None
    members: list[EtcdMember] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="etcd-test-"))
        for i in range(self.size):
            self.members.append(
                EtcdMember(
                    name=f"m{i}",
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=self._root / f"m{i}",
                    host=self.host,
                )
            )

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.scheme}://{m.host}:{m.client_port}" for m in self.members]

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, member: EtcdMember, *, wait: bool = True) -> None:
        cmd = [
            "etcd",
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", f"{self.scheme}://{member.host}:{member.client_port}",
            "--advertise-client-urls", f"{self.scheme}://{member.host}:{member.client_port}",
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-state", "new",
            "--logger=zap", "--log-level=error",
        ]  # fmt: skip
        if self.tls:
            cmd += [
                "--cert-file", str(self.tls.cert),
                "--key-file", str(self.tls.key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        member.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait and not self.tls:
            self._wait_healthy(member)

    def start(self) -> EtcdCluster:
        for member in self.members:
            self.start_member(member, wait=False)
        for member in self.members:
            if self.tls:
                self._wait_port(member)
            else:
                self._wait_healthy(member)
        return self

    def _wait_healthy(self, member: EtcdMember, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._healthy(member):
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd member {member.name} did not become healthy")

    def _healthy(self, member: EtcdMember) -> bool:
        if self.netns:
            # Not reachable from this namespace: ask from inside.
            result = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "etcdctl",
                    f"--endpoints={member.client_url}",
                    "--dial-timeout=1s",
                    "endpoint",
                    "health",
                ],
                capture_output=True,
                env={**os.environ, "ETCDCTL_API": "3"},
            )
            return result.returncode == 0
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def _wait_port(self, member: EtcdMember, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((member.host, member.client_port), timeout=1):
                    time.sleep(0.3)
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"etcd member {member.name} did not listen")

    def stop_member(self, member: EtcdMember) -> None:
        if member.proc is not None:
            stop_process(member.proc)
        member.proc = None

    def stop(self) -> None:
        for member in self.members:
            self.stop_member(member)

    def restart(self) -> None:
        # A member restarted on its data dir rejoins; --initial-cluster-state is then ignored.
        self.stop()
        self.start()

    def etcdctl(self, *args: str, input: str | None = None) -> str:
        cmd = ["etcdctl", f"--endpoints={self.endpoint}", *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        if self.tls:
            cmd += [f"--cacert={self.tls.ca}", f"--cert={self.tls.cert}", f"--key={self.tls.key}"]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=True,
        )
        return result.stdout

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)
